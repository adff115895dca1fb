"""Generate shared/fhirkit/search/parameters.json from the official FHIR core package.

Usage:
    python scripts/generate_search_parameters.py                 # npm pack hl7.fhir.r4b.core@4.3.0
    python scripts/generate_search_parameters.py --package X.tgz # an already downloaded package

Which definitions: every SearchParameter of the package whose version is the package's own (the
package also ships examples, e.g. a second `_id`) and that is not defined on an extension
(`patient-extensions-Patient-age`, ...), for the resource types in RESOURCE_TYPES, plus the
common `Resource` parameters except those in SKIPPED_COMMON.

R4B vs R4. The server declares FHIR R4 (4.0.1) but npm only serves the R4B core package. The
R4B definitions for these types were compared with R4 4.0.1's `search-parameters.json` bundle:
- same codes, types, expressions (`(X as T)`, `.as(T)`, `.where(resolve() is T)`) and choice
  element types, except:
- `encounter` (clinical-encounter): R4 targets Encounter | EpisodeOfCare, R4B only Encounter; and
  for DocumentReference R4 is `DocumentReference.context.encounter`, R4B adds
  `.where(resolve() is Encounter)` (an EpisodeOfCare in that element is no longer indexed).
- `subject` of Observation and DiagnosticReport: R4B targets add Medication, Organization,
  Practitioner, Procedure, Substance (R4: Device, Group, Location, Patient).
- Bundle `composition` / `message`: R4 targets Composition / MessageHeader, R4B none.
- Targets meaning "any resource" list R4B's resource set (adds Citation, ClinicalUseDefinition,
  SubscriptionTopic, ...; drops MedicinalProduct*, EffectEvidenceSynthesis, ...).
- SubscriptionTopic and its parameters exist only in R4B (the backport of R5 topic-based
  subscriptions); Subscription's parameters are unchanged.
- The genetics parameters (Observation amino-acid-change, dna-variant, gene-*; DiagnosticReport
  assessed-condition) are in R4B's core package; R4 published them with the genetics profiles.
  They are `X.extension('url')` expressions and select Extension elements.
- `DocumentReference-relationship` keeps its components as published in both (relatesto paired
  with `code`, relation with `target`).

Output: {"source": {...}, "resources": {type: {code: param}}}, keys sorted, one line per
parameter so that a regeneration shows up as a readable diff. Each parameter's `paths` is its
expression compiled into dictionary walks, or null when it needs a FHIRPath engine. A path
alternative is a list of steps, or {"keys": [steps], "resolve_is": "T"} for a trailing
`.where(resolve() is T)`. A step is a JSON key (str), a list of JSON keys (the concrete keys of
a choice element, at most one of which is present), an int (FHIRPath indexer `[n]` on the
collection built so far), or {"where": {key: "literal"}} keeping the elements whose single
primitive `key` equals the literal (`.where(system='email')`; `.extension('u')` is
`extension` then {"where": {"url": "u"}}). `(X.y as T)`, `X.y.as(T)` and `X.y.ofType(T)` on a
choice element all become the one key `yT`: the walk gives `ofType` semantics, as R4 servers do
(strict `as` fails on a collection of several elements, e.g. several Observation.component).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_SPEC = "hl7.fhir.r4b.core@4.3.0"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "shared" / "fhirkit" / "search" / "parameters.json"

RESOURCE_TYPES: tuple[str, ...] = (
    "Patient", "Organization", "Practitioner", "PractitionerRole", "Location", "HealthcareService",
    "Endpoint", "ServiceRequest", "Task", "Condition", "Encounter", "EpisodeOfCare", "CareTeam",
    "CarePlan", "Observation", "DiagnosticReport", "ImagingStudy", "Specimen", "Media",
    "DocumentReference", "Composition", "Binary", "Bundle", "Procedure", "Device", "SupplyRequest",
    "SupplyDelivery", "DetectedIssue", "Flag", "CodeSystem", "ValueSet", "ConceptMap",
    "VerificationResult", "Appointment", "AppointmentResponse", "Schedule", "Slot", "Communication",
    "CommunicationRequest", "AuditEvent", "Subscription", "SubscriptionTopic", "Consent", "Provenance",
)  # fmt: skip

COMMON_BASES = frozenset({"Resource", "DomainResource"})
# Handled by the engine itself (_has, _type) or not supported (full text, named queries, lists, _filter).
SKIPPED_COMMON = frozenset({"_text", "_content", "_query", "_list", "_has", "_type", "_filter"})
# Binary and Bundle are Resources, not DomainResources.
NOT_DOMAIN_RESOURCES = frozenset({"Binary", "Bundle", "Parameters"})

SYSTEM_TO_FHIR = {
    "Boolean": "boolean", "String": "string", "Integer": "integer", "Decimal": "decimal",
    "Date": "date", "DateTime": "dateTime", "Time": "time",
}  # fmt: skip

PathStep = str | int | list[str] | dict[str, dict[str, str]]
PathAlternative = list[PathStep] | dict[str, Any]


class Unsupported(Exception):
    """The expression needs a FHIRPath engine; it is not a plain dictionary walk."""


# ---------------------------------------------------------------------------- package reading


def fetch_package(workdir: Path) -> Path:
    subprocess.run(
        ["npm", "pack", PACKAGE_SPEC, "--silent"], cwd=workdir, check=True, stdout=subprocess.DEVNULL
    )
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise SystemExit(f"npm pack produced {len(tarballs)} tarballs in {workdir}")
    return tarballs[0]


def read_package(tarball: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    search_params: list[dict[str, Any]] = []
    structure_defs: list[dict[str, Any]] = []
    version = ""
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            name = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or not name.endswith(".json"):
                continue
            if member.name == "package/package.json":
                version = _load_member(archive, member)["version"]
            elif name.startswith("SearchParameter-"):
                search_params.append(_load_member(archive, member))
            elif name.startswith("StructureDefinition-"):
                structure_defs.append(_load_member(archive, member))
    # The package also ships example SearchParameters (a second `_id`, `_filter`, ...): the
    # specification's own definitions are the ones carrying the package version. Parameters on
    # extensions (`patient-extensions-Patient-age`, ...) are not the resources' own, and several
    # of them have no expression at all.
    search_params = [
        sp for sp in search_params if sp.get("version") == version and "-extensions-" not in sp["id"]
    ]
    search_params.sort(key=lambda sp: sp["id"])
    return search_params, structure_defs


def _load_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, Any]:
    stream = archive.extractfile(member)
    assert stream is not None
    return json.loads(stream.read())


# ---------------------------------------------------------------------------- type model


@dataclass(frozen=True)
class Element:
    types: tuple[str, ...]
    content_reference: str | None
    is_choice: bool
    max: str

    @property
    def is_single_primitive(self) -> bool:
        if self.is_choice or self.max != "1" or len(self.types) != 1:
            return False
        # FHIR primitive type codes are lower case; `id`/`url` of elements use System types.
        return self.types[0][0].islower() or self.types[0].startswith("http://hl7.org/fhirpath/System.")


class TypeModel:
    """Element definitions of the base resources and data types, to resolve paths and choices."""

    def __init__(self, structure_defs: Iterable[dict[str, Any]]) -> None:
        self.elements: dict[str, Element] = {}
        self.aliases: dict[str, str] = {}
        for sd in structure_defs:
            self._add(sd)

    def _add(self, sd: dict[str, Any]) -> None:
        if sd.get("kind") not in ("resource", "complex-type", "primitive-type"):
            return
        if sd.get("derivation") == "constraint":
            # Profiles of data types (Age, Duration, ...) navigate like the type they constrain.
            self.aliases.setdefault(sd["name"], sd["type"])
            return
        for element in sd.get("snapshot", {}).get("element", []):
            if ":" in element.get("id", ""):
                continue
            path: str = element["path"]
            types = tuple(t["code"] for t in element.get("type", []))
            is_choice = path.endswith("[x]")
            key = path[:-3] if is_choice else path
            self.elements[key] = Element(
                types, element.get("contentReference"), is_choice, element.get("max", "*")
            )

    def child(self, context: str, name: str) -> tuple[Element, str]:
        path = f"{context}.{name}"
        element = self.elements.get(path)
        if element is None:
            raise Unsupported(f"unknown element {path}")
        return element, path

    def context_of(self, element: Element, path: str, type_name: str | None = None) -> str:
        """Where navigation continues after `element` (of the given concrete type for a choice)."""
        if element.content_reference:
            return element.content_reference.split("#", 1)[-1]
        if type_name is None:
            if len(element.types) != 1:
                raise Unsupported(f"{path} has no single type")
            type_name = element.types[0]
        if type_name in ("BackboneElement", "Element"):
            return path
        return self.aliases.get(type_name, type_name)


# ---------------------------------------------------------------------------- FHIRPath subset

TOKEN_RE = re.compile(
    r"\s*(?:(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|`(?P<quoted>[^`]+)`|(?P<num>\d+)"
    r"|(?P<str>'(?:[^'\\]|\\.)*')|(?P<op>!=|<=|>=|[().\[\]|=,<>+\-*/&~]))"
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


def tokenize(expression: str) -> list[Token]:
    tokens: list[Token] = []
    position = 0
    stripped = expression.rstrip()
    while position < len(stripped):
        match = TOKEN_RE.match(stripped, position)
        if match is None or match.end() == position:
            raise Unsupported(f"cannot tokenize {expression!r} at {position}")
        kind = match.lastgroup or "op"
        text = match.group(kind)
        tokens.append(Token("ident" if kind == "quoted" else kind, text))
        position = match.end()
    return tokens


def split_union(expression: str) -> list[str]:
    """Split on top-level `|` (outside parentheses, brackets and string literals)."""
    parts: list[str] = []
    depth = 0
    start = 0
    in_string = False
    for index, char in enumerate(expression):
        if in_string:
            in_string = char != "'" or expression[index - 1] == "\\"
        elif char == "'":
            in_string = True
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(expression[start:index].strip())
            start = index + 1
    parts.append(expression[start:].strip())
    return [part for part in parts if part]


def root_of(part: str) -> str:
    match = re.match(r"\(*\s*([A-Za-z_][A-Za-z0-9_]*)", part)
    if match is None:
        raise ValueError(f"expression part without a root: {part!r}")
    return match.group(1)


@dataclass(frozen=True)
class Step:
    kind: str  # "name" | "as" | "index" | "where" | "resolve_is"
    value: str | int | tuple[str, str]


class PartParser:
    """Parses one union operand of the supported subset into steps; anything else is Unsupported.

    Supported: `Root.a.b`, `(Root.a as T)[.c...]`, `.as(T)`, `.ofType(T)`, `[n]`,
    `.where(key = 'literal')`, `.extension('url')` and a final `.where(resolve() is T)`. With
    `relative`, the first identifier is a step, not a root.
    """

    def __init__(self, part: str, relative: bool) -> None:
        self.tokens = tokenize(part)
        self.position = 0
        self.relative = relative

    def parse(self) -> list[Step]:
        steps: list[Step] = []
        if self._peek("("):
            self._expect("(")
            steps += self._path()
            self._expect_ident("as")
            steps.append(Step("as", self._type_name()))
            self._expect(")")
        else:
            steps += self._path()
        while self.position < len(self.tokens):
            steps += self._suffix()
        return steps

    def _path(self) -> list[Step]:
        first = self._ident()
        steps = [Step("name", first)] if self.relative else []
        # Stops at the infix `as` of `(X.y as T)`, or at anything that is not navigation.
        while self._peek(".") or self._peek("["):
            steps += self._suffix()
        return steps

    def _suffix(self) -> list[Step]:
        if self._peek("["):
            self._expect("[")
            token = self._next()
            if token.kind != "num":
                raise Unsupported("non-literal indexer")
            self._expect("]")
            return [Step("index", int(token.text))]
        self._expect(".")
        name = self._ident()
        if not self._peek("("):
            return [Step("name", name)]
        self._expect("(")
        if name in ("as", "ofType"):
            type_name = self._type_name()
            self._expect(")")
            return [Step("as", type_name)]
        if name == "where":
            if self._peek("resolve"):
                return [self._resolve_is_filter()]
            return [self._equality_filter()]
        if name == "extension":
            url = self._string()
            self._expect(")")
            return [Step("name", "extension"), Step("where", ("url", url))]
        raise Unsupported(f"function {name}()")

    def _equality_filter(self) -> Step:
        key = self._ident()
        self._expect("=")
        literal = self._string()
        self._expect(")")
        return Step("where", (key, literal))

    def _string(self) -> str:
        token = self._next()
        if token.kind != "str" or "\\" in token.text:
            raise Unsupported("expected a plain string literal")
        return token.text[1:-1]

    def _resolve_is_filter(self) -> Step:
        for text in ("resolve", "(", ")", "is"):
            if self._next().text != text:
                raise Unsupported("where() other than resolve() is T")
        type_name = self._type_name()
        self._expect(")")
        if self.position != len(self.tokens):
            raise Unsupported("navigation after where(resolve() is T)")
        return Step("resolve_is", type_name)

    def _type_name(self) -> str:
        name = self._ident()
        if self._peek("."):  # FHIR.Quantity / System.String
            if name != "FHIR":
                raise Unsupported(f"type namespace {name}")
            self._expect(".")
            name = self._ident()
        return name

    def _ident(self) -> str:
        token = self._next()
        if token.kind != "ident":
            raise Unsupported(f"expected identifier, got {token.text!r}")
        return token.text

    def _expect_ident(self, text: str) -> None:
        if self._ident() != text:
            raise Unsupported(f"expected {text!r}")

    def _expect(self, text: str) -> None:
        token = self._next()
        if token.text != text:
            raise Unsupported(f"expected {text!r}, got {token.text!r}")

    def _next(self) -> Token:
        if self.position >= len(self.tokens):
            raise Unsupported("unexpected end of expression")
        token = self.tokens[self.position]
        self.position += 1
        return token

    def _peek(self, text: str) -> bool:
        return self._peek_at(0) == text

    def _peek_at(self, offset: int) -> str | None:
        index = self.position + offset
        return self.tokens[index].text if index < len(self.tokens) else None


def compile_part(model: TypeModel, context: str, part: str, relative: bool = False) -> PathAlternative:
    """Compile one union operand into one walk, starting at `context` (a type or element path)."""
    steps = PartParser(part, relative).parse()
    keys: list[PathStep] = []
    resolve_is: str | None = None
    choice_open = False  # a multi-key choice step must be the last navigation step
    index = 0
    while index < len(steps):
        step = steps[index]
        following = steps[index + 1] if index + 1 < len(steps) else None
        if choice_open and step.kind != "resolve_is":
            raise Unsupported("navigation after an unresolved choice element")
        if step.kind == "name":
            element, path = model.child(context, str(step.value))
            if following is not None and following.kind == "as":
                key, context = _narrow(model, element, path, str(step.value), str(following.value))
                keys.append(key)
                index += 2
                continue
            if element.is_choice:
                keys.append([str(step.value) + _capitalize(t) for t in element.types])
                choice_open = True
            else:
                keys.append(str(step.value))
                context = model.context_of(element, path)
        elif step.kind == "index":
            keys.append(int(step.value))
        elif step.kind == "where":
            keys.append(_equality_step(model, context, step.value))  # type: ignore[arg-type]
        elif step.kind == "resolve_is":
            resolve_is = str(step.value)
        else:
            raise Unsupported("`as` without a preceding element")
        index += 1
    if resolve_is is not None:
        return {"keys": keys, "resolve_is": resolve_is}
    return keys


def _equality_step(model: TypeModel, context: str, condition: tuple[str, str]) -> dict[str, dict[str, str]]:
    key, literal = condition
    element, path = model.child(context, key)
    # A repeated or complex element would compare collections, which a key lookup does not do.
    if not element.is_single_primitive:
        raise Unsupported(f"where() on {path}, not a single primitive")
    return {"where": {key: literal}}


def _narrow(model: TypeModel, element: Element, path: str, name: str, type_name: str) -> tuple[str, str]:
    if type_name not in element.types:
        # `value.as(DateTime)` (Observation-code-value-date) names the System type of a FHIR primitive.
        type_name = SYSTEM_TO_FHIR.get(type_name, type_name)
    if element.is_choice:
        if type_name not in element.types:
            raise Unsupported(f"{path}[x] has no type {type_name}")
        return name + _capitalize(type_name), model.context_of(element, path, type_name)
    if element.types != (type_name,):
        raise Unsupported(f"{path} is not of type {type_name}")
    return name, model.context_of(element, path)


def _capitalize(type_name: str) -> str:
    return type_name[0].upper() + type_name[1:]


def compile_expression(
    model: TypeModel, context: str, expression: str, relative: bool = False
) -> list[PathAlternative] | None:
    try:
        return [compile_part(model, context, part, relative) for part in split_union(expression)]
    except Unsupported:
        return None


# ---------------------------------------------------------------------------- table building


def parts_by_base(search_param: dict[str, Any]) -> dict[str, list[str]]:
    """The union operands of a multi-base expression, grouped by the type each one starts from."""
    grouped: dict[str, list[str]] = {}
    for part in split_union(search_param.get("expression", "")):
        grouped.setdefault(root_of(part), []).append(part)
    return grouped


def expression_for(search_param: dict[str, Any], resource_type: str) -> str | None:
    bases = set(search_param.get("base", []))
    if bases & COMMON_BASES:
        expression = search_param.get("expression")
        if not expression:
            return None
        # `Resource.meta.tag` evaluated on a Patient must be written `Patient.meta.tag` for FHIRPath.
        return re.sub(r"\b(?:Resource|DomainResource)\.", f"{resource_type}.", expression)
    parts = parts_by_base(search_param).get(resource_type)
    if not parts:
        raise ValueError(f"{search_param['id']}: no expression for base {resource_type}")
    return " | ".join(parts)


def build_parameter(
    model: TypeModel, search_param: dict[str, Any], resource_type: str, by_url: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    expression = expression_for(search_param, resource_type)
    if expression is None:
        return None
    record: dict[str, Any] = {
        "type": search_param["type"],
        "expression": expression,
        "url": search_param["url"],
        "paths": compile_expression(model, resource_type, expression),
    }
    if search_param.get("target"):
        record["target"] = sorted(search_param["target"])
    for source, target in (("multipleOr", "multipleOr"), ("multipleAnd", "multipleAnd")):
        if source in search_param:
            record[target] = search_param[source]
    for source in ("modifier", "comparator"):
        if search_param.get(source):
            record[source] = list(search_param[source])
    if search_param.get("component"):
        record["components"] = [
            _component(model, component, expression, resource_type, by_url)
            for component in search_param["component"]
        ]
    return record


def _component(
    model: TypeModel,
    component: dict[str, Any],
    base_expression: str,
    resource_type: str,
    by_url: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    definition = by_url.get(component["definition"], {})
    record: dict[str, Any] = {
        "definition": component["definition"],
        "code": definition.get("code"),
        "type": definition.get("type"),
        "expression": component["expression"],
        "paths": _component_paths(model, base_expression, component["expression"], resource_type),
    }
    return record


def _component_paths(
    model: TypeModel, base_expression: str, expression: str, resource_type: str
) -> list[PathAlternative] | None:
    """Relative paths, valid from every element the composite's own expression selects."""
    merged: list[PathAlternative] = []
    for context in _contexts(model, base_expression, resource_type):
        compiled = compile_expression(model, context, expression, relative=True)
        if compiled is None:
            return None
        merged += [alternative for alternative in compiled if alternative not in merged]
    return merged


def _contexts(model: TypeModel, base_expression: str, resource_type: str) -> Iterator[str]:
    for part in split_union(base_expression):
        context = resource_type
        for name in part.split(".")[1:]:
            element, path = model.child(context, name)
            context = model.context_of(element, path)
        yield context


def build_table(
    search_params: list[dict[str, Any]], structure_defs: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    model = TypeModel(structure_defs)
    by_url = {sp["url"]: sp for sp in search_params}
    table: dict[str, dict[str, Any]] = {resource_type: {} for resource_type in RESOURCE_TYPES}
    for search_param in search_params:
        for resource_type in _applicable_types(search_param):
            record = build_parameter(model, search_param, resource_type, by_url)
            if record is None:
                continue
            code = search_param["code"]
            if code in table[resource_type]:
                raise ValueError(f"duplicate parameter {resource_type}.{code}")
            table[resource_type][code] = record
    return table


def _applicable_types(search_param: dict[str, Any]) -> list[str]:
    bases = set(search_param.get("base", []))
    if bases & COMMON_BASES:
        if search_param["code"] in SKIPPED_COMMON:
            return []
        domain_only = bases == {"DomainResource"}
        return [t for t in RESOURCE_TYPES if not (domain_only and t in NOT_DOMAIN_RESOURCES)]
    return [t for t in RESOURCE_TYPES if t in bases]


def render(table: dict[str, dict[str, Any]], package: str) -> str:
    lines = [
        "{",
        f'"source": {json.dumps({"package": package, "generator": "scripts/generate_search_parameters.py"}, sort_keys=True)},',
    ]
    lines.append('"resources": {')
    types = sorted(table)
    for type_index, resource_type in enumerate(types):
        lines.append(f"{json.dumps(resource_type)}: {{")
        codes = sorted(table[resource_type])
        for code_index, code in enumerate(codes):
            body = json.dumps(
                table[resource_type][code], sort_keys=True, ensure_ascii=False, separators=(",", ":")
            )
            comma = "," if code_index < len(codes) - 1 else ""
            lines.append(f"  {json.dumps(code)}: {body}{comma}")
        lines.append("}" + ("," if type_index < len(types) - 1 else ""))
    lines.append("}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def summarize(table: dict[str, dict[str, Any]]) -> str:
    lines = []
    for resource_type in sorted(table):
        params = table[resource_type]
        fallback = sorted(code for code, p in params.items() if p["paths"] is None)
        lines.append(f"{resource_type}: {len(params)} parameters, {len(fallback)} via FHIRPath {fallback}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--package", type=Path, help=f"path to the {PACKAGE_SPEC} .tgz (default: npm pack it)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        tarball = args.package or fetch_package(Path(workdir))
        search_params, structure_defs = read_package(tarball)
    table = build_table(search_params, structure_defs)
    args.output.write_text(render(table, PACKAGE_SPEC), encoding="utf-8")
    if not args.quiet:
        print(summarize(table), file=sys.stderr)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
