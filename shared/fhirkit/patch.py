"""The three PATCH body formats a FHIR server accepts, as pure functions on FHIR JSON dicts.

- JSON Patch (RFC 6902, application/json-patch+json): `apply_json_patch`
- FHIRPath Patch (a Parameters resource, https://hl7.org/fhir/R4/fhirpatch.html): `apply_fhirpath_patch`
- JSON Merge Patch (RFC 7386, application/merge-patch+json or plain application/json): `apply_merge_patch`

Every function returns a new dict, never mutates its arguments, refuses to change `resourceType` or
`id` (the server owns them), and strips the `{}`, `[]` and `null` that FHIR JSON forbids.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from itertools import zip_longest
from typing import Any

import fhirpathpy
import jsonpatch
from fhir.resources.R4B import get_fhir_model_class
from fhirpathpy.models import models as fhirpath_models
from pydantic import BaseModel

__all__ = ["PatchError", "apply_fhirpath_patch", "apply_json_patch", "apply_merge_patch"]

JsonObject = dict[str, Any]

# The server owns these: a patch may read them but never change them.
_IDENTITY_KEYS = ("resourceType", "id")


class PatchError(ValueError):
    """A patch that is malformed (400, `invalid`) or cannot be applied (422, `processing`)."""

    def __init__(
        self, reason: str, *, index: int | None = None, path: str | None = None, status_code: int = 422
    ) -> None:
        self.reason = reason
        self.index = index
        self.path = path
        self.status_code = status_code
        self.issue_code = "invalid" if status_code == 400 else "processing"
        # FhirError-compatible, so the API layer can render an OperationOutcome the same way.
        self.expression = [path] if path else []
        super().__init__(_describe(reason, index, path))

    def at(self, index: int | None, path: str | None) -> PatchError:
        return PatchError(self.reason, index=index, path=path or self.path, status_code=self.status_code)


def _describe(reason: str, index: int | None, path: str | None) -> str:
    where = []
    if index is not None:
        where.append(f"operation {index}")
    if path is not None:
        where.append(f"path '{path}'")
    return f"{', '.join(where)}: {reason}" if where else reason


def _malformed(reason: str) -> PatchError:
    return PatchError(reason, status_code=400)


# ---------------------------------------------------------------------------------------------------
# Shared: argument checks, identity guard, removal of empty values
# ---------------------------------------------------------------------------------------------------

_MISSING: Any = object()


def _require_resource(resource: Any) -> JsonObject:
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise _malformed("the patch target must be a FHIR resource with a resourceType")
    return resource


def _check_identity(
    before: JsonObject, after: Any, index: int | None = None, path: str | None = None
) -> None:
    if not isinstance(after, dict):
        raise PatchError("the patch must leave a JSON object", index=index, path=path)
    for key in _IDENTITY_KEYS:
        if after.get(key) != before.get(key):
            raise PatchError(
                f"'{key}' is owned by the server and cannot be changed by a patch", index=index, path=path
            )


def _prune(value: Any) -> Any:
    """The value without empty objects, empty arrays and nulls; _MISSING if nothing is left."""
    if isinstance(value, dict):
        return _prune_object(value)
    if isinstance(value, list):
        return _prune_list(value, keep_nulls=False)
    return _MISSING if value is None else value


def _prune_object(obj: JsonObject) -> Any:
    # Shadow keys (`_given`) first: a value array may keep its nulls only while its shadow survives.
    shadows = {key: _prune_member(obj, key, keep_nulls=key[1:] in obj) for key in obj if key.startswith("_")}
    out: JsonObject = {}
    for key in obj:
        if key.startswith("_"):
            pruned = shadows[key]
        else:
            aligned = shadows.get("_" + key, _MISSING) is not _MISSING
            pruned = _prune_member(obj, key, keep_nulls=aligned)
        if pruned is not _MISSING:
            out[key] = pruned
    return out or _MISSING


def _prune_member(obj: JsonObject, key: str, keep_nulls: bool) -> Any:
    member = obj[key]
    return _prune_list(member, keep_nulls) if isinstance(member, list) else _prune(member)


def _prune_list(items: list[Any], keep_nulls: bool) -> Any:
    pruned = [_prune(item) for item in items]
    if keep_nulls:
        # FHIR JSON aligns `given` and `_given` by position and fills the gaps with null.
        aligned = [None if item is _MISSING else item for item in pruned]
        return aligned if any(item is not None for item in aligned) else _MISSING
    kept = [item for item in pruned if item is not _MISSING]
    return kept or _MISSING


def _finish(original: JsonObject, patched: Any) -> JsonObject:
    result = _prune(patched)
    _check_identity(original, result)
    return result


# ---------------------------------------------------------------------------------------------------
# JSON Patch (RFC 6902)
# ---------------------------------------------------------------------------------------------------

_JSON_PATCH_OPS = {"add", "remove", "replace", "move", "copy", "test"}
_JSON_PATCH_REQUIRED = {
    "add": ("value",),
    "replace": ("value",),
    "test": ("value",),
    "move": ("from",),
    "copy": ("from",),
}


def apply_json_patch(resource: dict, operations: list) -> dict:
    original = _require_resource(resource)
    if not isinstance(operations, list):
        raise _malformed("a JSON Patch body must be a JSON array of operations")
    document: Any = copy.deepcopy(original)
    for index, operation in enumerate(operations):
        _check_json_operation(operation, index)
        # Copied so that later operations editing an inserted value never reach into the caller's list.
        document = _apply_json_operation(document, copy.deepcopy(operation), index)
        _check_identity(original, document, index, operation["path"])
    return _finish(original, document)


def _check_json_operation(operation: Any, index: int) -> None:
    if not isinstance(operation, dict):
        raise PatchError("each JSON Patch operation must be an object", index=index, status_code=400)
    name = operation.get("op")
    path = operation.get("path")
    if name not in _JSON_PATCH_OPS:
        raise PatchError(f"unknown JSON Patch operation {name!r}", index=index, status_code=400)
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise PatchError(
            "'path' must be a JSON Pointer string", index=index, path=_text(path), status_code=400
        )
    for member in _JSON_PATCH_REQUIRED.get(name, ()):
        if member not in operation:
            raise PatchError(f"'{name}' needs a '{member}' member", index=index, path=path, status_code=400)


def _apply_json_operation(document: Any, operation: JsonObject, index: int) -> Any:
    path = operation["path"]
    try:
        return jsonpatch.apply_patch(document, [operation], in_place=True)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise PatchError(f"test failed: {exc}", index=index, path=path) from None
    except jsonpatch.InvalidJsonPatch as exc:
        raise PatchError(str(exc), index=index, path=path, status_code=400) from None
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise PatchError(f"cannot apply '{operation['op']}': {exc}", index=index, path=path) from None
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise PatchError(f"cannot apply '{operation['op']}': {exc}", index=index, path=path) from None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


# ---------------------------------------------------------------------------------------------------
# JSON Merge Patch (RFC 7386)
# ---------------------------------------------------------------------------------------------------


def apply_merge_patch(resource: dict, patch: dict) -> dict:
    original = _require_resource(resource)
    if not isinstance(patch, dict):
        raise _malformed("a merge patch body must be a JSON object")
    for key in _IDENTITY_KEYS:
        if key in patch and patch[key] != original.get(key):
            raise PatchError(f"'{key}' is owned by the server and cannot be changed by a patch", path=key)
    return _finish(original, _merge(original, patch))


def _merge(target: Any, patch: Any) -> Any:
    # Containers may be shared with the inputs here: _finish rebuilds every dict and list.
    if not isinstance(patch, dict):
        return patch  # arrays and scalars replace the target wholesale
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge(merged.get(key), value)
    return merged


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch: the element tree
#
# FHIR JSON splits a primitive over two keys (`birthDate` and `_birthDate` for its id/extension).
# FHIRPath sees one element, so the patch works on a "lifted" tree where each primitive is a
# _Primitive holding both halves; list operations then keep `given` and `_given` aligned for free.
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Primitive:
    value: Any  # None when the element has only an id or extensions
    extras: JsonObject = field(default_factory=dict)  # lifted content of the `_name` shadow key


def _lift(obj: JsonObject) -> JsonObject:
    out: JsonObject = {}
    for key, member in obj.items():
        if key == "resourceType":
            out[key] = member
        elif not key.startswith("_"):
            out[key] = _lift_member(member, obj.get("_" + key))
        elif key[1:] not in obj:
            out[key[1:]] = _lift_member(None, member)
    return out


def _lift_member(member: Any, shadow: Any) -> Any:
    if isinstance(member, list) or isinstance(shadow, list):
        values = member if isinstance(member, list) else []
        shadows = shadow if isinstance(shadow, list) else []
        return [_lift_item(value, extra) for value, extra in zip_longest(values, shadows)]
    return _lift_item(member, shadow)


def _lift_item(value: Any, shadow: Any) -> Any:
    if isinstance(value, dict):
        return _lift(value)
    return _Primitive(value, _lift(shadow) if isinstance(shadow, dict) else {})


def _lower(obj: JsonObject, with_shadows: bool = True) -> JsonObject:
    out: JsonObject = {}
    for key, member in obj.items():
        items = member if isinstance(member, list) else [member]
        values = [_lower_value(item, with_shadows) for item in items]
        out[key] = values if isinstance(member, list) else values[0]
        shadows = [
            _lower(item.extras) if isinstance(item, _Primitive) and item.extras else None for item in items
        ]
        if with_shadows and any(shadow is not None for shadow in shadows):
            out["_" + key] = shadows if isinstance(member, list) else shadows[0]
    return out


def _lower_value(item: Any, with_shadows: bool) -> Any:
    if isinstance(item, _Primitive):
        return item.value
    if isinstance(item, dict):
        return _lower(item, with_shadows)
    return item


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, _Primitive) else value


def _is_empty(value: Any) -> bool:
    return _prune(_lower({"v": value}).get("v")) is _MISSING


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch: structure definitions
#
# Cardinality and choice types ("value[x]") come from the fhir.resources R4B models, the same ones
# the server validates with; R4B is R4 for every resource this server stores.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    key: str  # the JSON key, e.g. "valueQuantity"
    repeats: bool
    choice: str | None  # "value" for valueQuantity
    model: type | None  # the model of a complex type; None for primitives


@dataclass(frozen=True)
class _Schema:
    name: str
    fields: dict[str, _Field]
    choices: dict[str, tuple[str, ...]]


@cache
def _schema_of_model(model: type) -> _Schema:
    fields: dict[str, _Field] = {}
    choices: dict[str, list[str]] = {}
    for name, info in model.model_fields.items():
        if name.endswith("__ext") or name in ("fhir_comments", "resource_type"):
            continue
        key = info.alias or name
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        choice = extra.get("one_of_many")
        repeats, child = _unwrap_annotation(info.annotation)
        fields[key] = _Field(key, repeats, choice, child)
        if choice:
            choices.setdefault(choice, []).append(key)
    return _Schema(model.__name__, fields, {name: tuple(keys) for name, keys in choices.items()})


def _unwrap_annotation(annotation: Any) -> tuple[bool, type | None]:
    repeats, model = False, None
    pending = [annotation]
    while pending:
        current = pending.pop()
        origin = typing.get_origin(current)
        if origin is list:
            repeats = True
        if hasattr(current, "get_model_klass"):
            model = current.get_model_klass()
        elif isinstance(current, type) and issubclass(current, BaseModel):
            model = current
        args = typing.get_args(current)
        # Annotated[...] metadata (constraints) is not a type: only its first argument is.
        pending.extend(args[:1] if origin is typing.Annotated else args)
    return repeats, model


@cache
def _schema_of_type(type_name: str) -> _Schema | None:
    try:
        return _schema_of_model(get_fhir_model_class(type_name))
    except (KeyError, ValueError, AttributeError, ImportError):
        return None


def _schema_of(field_info: _Field | None, value: Any) -> _Schema | None:
    if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
        return _schema_of_type(value["resourceType"])
    if field_info is None or field_info.model is None:
        return None
    return _schema_of_model(field_info.model)


def _element_schema() -> _Schema | None:
    # What a primitive can hold besides its value: id and extension.
    return _schema_of_type("Element")


_R4_MODEL = fhirpath_models["r4"]
# Type suffixes of choice elements, for data the models do not describe.
_CHOICE_SUFFIXES = frozenset(suffix for types in _R4_MODEL["choiceTypePaths"].values() for suffix in types)


def _child_type_path(parent: str | None, key: str, value: Any) -> str | None:
    """The FHIRPath type of an element, so that where() conditions can resolve choice types."""
    if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
        return value["resourceType"]
    if key in ("extension", "modifierExtension"):
        return "Extension"
    if parent is None:
        return None
    path = f"{parent}.{key}"
    path = _R4_MODEL["pathsDefinedElsewhere"].get(path, path)
    type_name = _R4_MODEL["path2Type"].get(path)
    if type_name is None:
        return path  # a backbone element: FHIRPath names its type by its path
    return type_name if type_name[0].isupper() and "." not in type_name else None


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch: locating elements
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Node:
    holder: JsonObject  # the lifted object (or _Primitive.extras) that owns the element
    key: str
    index: int | None  # position when holder[key] is a list
    holder_schema: _Schema | None
    type_path: str | None

    @property
    def value(self) -> Any:
        member = self.holder[self.key]
        return member if self.index is None else member[self.index]

    @property
    def field(self) -> _Field | None:
        return self.holder_schema.fields.get(self.key) if self.holder_schema else None

    @property
    def schema(self) -> _Schema | None:
        return _schema_of(self.field, self.value)


_ROOT_KEY = "$resource"


def _root_node(lifted: JsonObject) -> _Node:
    return _Node({_ROOT_KEY: lifted}, _ROOT_KEY, None, None, lifted["resourceType"])


def _is_root(node: _Node) -> bool:
    return node.key == _ROOT_KEY


def _container_of(node: _Node) -> tuple[JsonObject, _Schema | None]:
    value = node.value
    if isinstance(value, _Primitive):
        return value.extras, _element_schema()
    if isinstance(value, dict):
        return value, node.schema
    raise PatchError("the path does not lead to an element that can hold children")


def _children(node: _Node, name: str) -> list[_Node]:
    if not isinstance(node.value, (dict, _Primitive)):
        return []
    container, schema = _container_of(node)
    nodes = []
    for key in _keys_for_name(container, schema, name):
        member = container[key]
        positions: Iterable[tuple[int | None, Any]] = (
            enumerate(member) if isinstance(member, list) else [(None, member)]
        )
        for index, item in positions:
            nodes.append(_Node(container, key, index, schema, _child_type_path(node.type_path, key, item)))
    return nodes


def _keys_for_name(container: JsonObject, schema: _Schema | None, name: str) -> list[str]:
    if name == "resourceType":
        return []
    if schema and name in schema.choices:
        return [key for key in schema.choices[name] if key in container]
    if name in container:
        return [name]
    if schema and name in schema.fields:
        return []
    # Unknown to the models: take FHIR JSON's naming rule for choice elements (name + type).
    return [key for key in container if key.startswith(name) and key[len(name) :] in _CHOICE_SUFFIXES]


# A path is parsed into steps: ("name", str), ("index", int) or ("call", (function, argument text)).
_Step = tuple[str, Any]
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEXER = re.compile(r"\[\s*(\d+)\s*\]")


def _parse_path(path: str) -> list[_Step]:
    steps: list[_Step] = []
    position, expect_name = 0, True
    while position < len(path):
        char = path[position]
        if char.isspace():
            position += 1
        elif expect_name:
            position = _parse_name_or_call(path, position, steps)
            expect_name = False
        elif char == ".":
            position, expect_name = position + 1, True
        elif match := _INDEXER.match(path, position):
            steps.append(("index", int(match.group(1))))
            position = match.end()
        else:
            raise _malformed(f"unexpected {char!r} at offset {position} of the FHIRPath")
    if expect_name:
        raise _malformed("the FHIRPath is empty or ends with '.'")
    return steps


def _parse_name_or_call(path: str, position: int, steps: list[_Step]) -> int:
    if path[position] == "`":
        end = path.find("`", position + 1)
        if end < 0:
            raise _malformed("unterminated `identifier` in the FHIRPath")
        steps.append(("name", path[position + 1 : end]))
        return end + 1
    match = _IDENTIFIER.match(path, position)
    if not match:
        raise _malformed(f"expected an element name at offset {position} of the FHIRPath")
    end = match.end()
    if end < len(path) and path[end] == "(":
        close = _closing_parenthesis(path, end)
        steps.append(("call", (match.group(), path[end + 1 : close].strip())))
        return close + 1
    steps.append(("name", match.group()))
    return end


def _closing_parenthesis(path: str, opening: int) -> int:
    depth, position, quote = 0, opening, None
    while position < len(path):
        char = path[position]
        if quote:
            if char == "\\":
                position += 1
            elif char == quote:
                quote = None
        elif char in "'`":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return position
        position += 1
    raise _malformed("unbalanced parentheses in the FHIRPath")


def _strip_resource_type(steps: list[_Step], resource_type: str) -> list[_Step]:
    if not steps or steps[0][0] != "name" or not steps[0][1][:1].isupper():
        return steps  # a path may also start at the resource's children
    if steps[0][1] in (resource_type, "Resource", "DomainResource"):
        return steps[1:]
    raise PatchError(f"the path starts with '{steps[0][1]}' but the resource is a {resource_type}")


def _select(root: _Node, steps: list[_Step]) -> list[_Node]:
    nodes = [root]
    for kind, argument in steps:
        if kind == "name":
            nodes = [child for node in nodes for child in _children(node, argument)]
        elif kind == "index":
            nodes = nodes[argument : argument + 1]
        else:
            nodes = _call(nodes, *argument)
    return nodes


def _call(nodes: list[_Node], function: str, argument: str) -> list[_Node]:
    handler = _FUNCTIONS.get(function)
    if handler is None:
        raise _malformed(f"FHIRPath function '{function}()' is not supported in a patch path")
    return handler(nodes, argument)


def _no_argument(function: str, argument: str) -> None:
    if argument:
        raise _malformed(f"'{function}()' takes no argument")


def _first(nodes: list[_Node], argument: str) -> list[_Node]:
    _no_argument("first", argument)
    return nodes[:1]


def _last(nodes: list[_Node], argument: str) -> list[_Node]:
    _no_argument("last", argument)
    return nodes[-1:]


def _single(nodes: list[_Node], argument: str) -> list[_Node]:
    _no_argument("single", argument)
    if len(nodes) > 1:
        raise PatchError(f"single() found {len(nodes)} elements")
    return nodes


def _extension(nodes: list[_Node], argument: str) -> list[_Node]:
    url = _string_literal(argument)
    candidates = [child for node in nodes for child in _children(node, "extension")]
    return [
        node for node in candidates if isinstance(node.value, dict) and _plain(node.value.get("url")) == url
    ]


def _of_type(nodes: list[_Node], argument: str) -> list[_Node]:
    type_name = argument.removeprefix("FHIR.")
    return [node for node in nodes if _has_type(node, type_name)]


def _has_type(node: _Node, type_name: str) -> bool:
    value = node.value
    if isinstance(value, dict) and value.get("resourceType") == type_name:
        return True
    choice = node.field.choice if node.field else None
    if choice and node.key == choice + type_name[:1].upper() + type_name[1:]:
        return True
    schema = node.schema
    return schema is not None and schema.name == type_name


def _where(nodes: list[_Node], condition: str) -> list[_Node]:
    if not condition:
        raise _malformed("where() needs a condition")
    return [node for node in nodes if _satisfies(node, condition)]


def _satisfies(node: _Node, condition: str) -> bool:
    value = node.value
    try:
        if isinstance(value, _Primitive):
            result = _evaluate_on_primitive(value, condition)
        else:
            result = _evaluate_on_element(value, node.type_path, condition)
    except Exception as exc:
        raise _malformed(f"cannot evaluate where({condition}): {exc}") from None
    return result == [True]


def _evaluate_on_primitive(value: _Primitive, condition: str) -> list[Any]:
    # fhirpathpy cannot take a bare primitive as $this, so the value is wrapped in a one-key object.
    return fhirpathpy.evaluate({"v": value.value}, f"v.where({condition}).exists()")


def _evaluate_on_element(value: JsonObject, type_path: str | None, condition: str) -> list[Any]:
    # fhirpathpy mis-compares primitives that carry a `_name` shadow, so shadows are only kept
    # when the condition looks at extensions or ids.
    with_shadows = bool(re.search(r"\b(extension|id)\b", condition))
    text = _existential(condition)
    expression: Any = {"base": type_path, "expression": text} if type_path else text
    return fhirpathpy.evaluate(_lower(value, with_shadows), expression, model=_R4_MODEL)


# `element.path = literal`, the form clients write inside where().
_SIMPLE_EQUALITY = re.compile(
    r"\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*=\s*('(?:[^'\\]|\\.)*'|-?\d+(?:\.\d+)?|true|false)\s*"
)


def _existential(condition: str) -> str:
    """Deliberate deviation: `code.coding.code = '8480-6'` means "some coding has code 8480-6".

    Strict FHIRPath compares whole collections, so that condition is false as soon as a concept
    carries a second coding (as in the HL7 blood-pressure example). Each `path = literal` clause of a
    plain `and` chain is therefore read as `path.where($this = literal).exists()`; anything more
    complex is evaluated as written.
    """
    clauses = _split_conjunction(condition)
    if clauses is None:
        return condition
    return " and ".join(_existential_clause(clause) for clause in clauses)


def _existential_clause(clause: str) -> str:
    match = _SIMPLE_EQUALITY.fullmatch(clause)
    if not match:
        return clause
    return f"{match.group(1)}.where($this = {match.group(2)}).exists()"


def _split_conjunction(condition: str) -> list[str] | None:
    """The top-level `and` clauses, or None when other boolean operators make splitting unsafe."""
    clauses: list[str] = []
    depth, start, quote = 0, 0, None
    for position, char in enumerate(condition):
        if quote:
            quote = None if char == quote and condition[position - 1] != "\\" else quote
        elif char in "'`":
            quote = char
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif depth == 0 and char.isspace():
            word = re.match(r"\s(and|or|xor|implies)\s", condition[position:])
            if word and word.group(1) != "and":
                return None
            if word:
                clauses.append(condition[start:position])
                start = position + len(word.group(0)) - 1
    clauses.append(condition[start:])
    return clauses


def _string_literal(argument: str) -> str:
    match = re.fullmatch(r"'((?:[^'\\]|\\.)*)'", argument.strip())
    if not match:
        raise _malformed(f"expected a quoted string, got {argument!r}")
    return re.sub(r"\\(.)", r"\1", match.group(1))


_FUNCTIONS: dict[str, Callable[[list[_Node], str], list[_Node]]] = {
    "first": _first,
    "last": _last,
    "single": _single,
    "where": _where,
    "extension": _extension,
    "ofType": _of_type,
}


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch: operations
# ---------------------------------------------------------------------------------------------------

_OPERATION_PARTS = {"type", "path", "name", "value", "index", "source", "destination"}
_REQUIRED_PARTS = {
    "add": ("name", "value"),
    "insert": ("value", "index"),
    "delete": (),
    "replace": ("value",),
    "move": ("source", "destination"),
}
_VALUE_KEY = re.compile(r"value([A-Z][A-Za-z0-9]*)")


@dataclass
class _Operation:
    type: str
    path: str
    parts: dict[str, JsonObject]

    def integer(self, name: str) -> int:
        part = self.parts[name]
        number = next(
            (part[key] for key in ("valueInteger", "valueUnsignedInt", "valuePositiveInt") if key in part),
            None,
        )
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise _malformed(f"'{name}' must be a non-negative valueInteger")
        return number

    def name(self) -> str:
        name = _part_string(self.parts["name"], "name")
        if not _IDENTIFIER.fullmatch(name):
            raise _malformed(f"'name' must be an element name, got {name!r}")
        return name


def apply_fhirpath_patch(resource: dict, parameters: dict) -> dict:
    original = _require_resource(resource)
    operations = _parse_operations(parameters)
    root = _root_node(_lift(original))
    for index, operation in enumerate(operations):
        try:
            _HANDLERS[operation.type](root, operation)
            _check_identity(original, _lower(root.value))
        except PatchError as exc:
            raise exc.at(index, operation.path) from None
    return _finish(original, _lower(root.value))


def _parse_operations(parameters: Any) -> list[_Operation]:
    if not isinstance(parameters, dict) or parameters.get("resourceType", "Parameters") != "Parameters":
        raise _malformed("a FHIRPath Patch body must be a Parameters resource")
    entries = parameters.get("parameter", [])
    if not isinstance(entries, list):
        raise _malformed("Parameters.parameter must be an array")
    operations = []
    for index, entry in enumerate(entries):
        try:
            operations.append(_parse_operation(entry))
        except PatchError as exc:
            raise exc.at(index, exc.path) from None
    return operations


def _parse_operation(entry: Any) -> _Operation:
    if not isinstance(entry, dict) or entry.get("name") != "operation":
        raise _malformed("every parameter of a FHIRPath Patch must be named 'operation'")
    parts = _parts_by_name(entry.get("part"))
    if "type" not in parts or "path" not in parts:
        raise _malformed("an operation needs a 'type' and a 'path' part")
    kind = _part_string(parts["type"], "type")
    path = _part_string(parts["path"], "path")
    if kind not in _REQUIRED_PARTS:
        raise PatchError(f"unknown operation type {kind!r}", path=path, status_code=400)
    for required in _REQUIRED_PARTS[kind]:
        if required not in parts:
            raise PatchError(f"'{kind}' needs a '{required}' part", path=path, status_code=400)
    return _Operation(kind, path, parts)


def _parts_by_name(parts: Any) -> dict[str, JsonObject]:
    if not isinstance(parts, list):
        raise _malformed("an operation must have parts")
    by_name: dict[str, JsonObject] = {}
    for part in parts:
        name = part.get("name") if isinstance(part, dict) else None
        if name not in _OPERATION_PARTS:
            raise _malformed(f"unknown operation part {name!r}")
        if name in by_name:
            raise _malformed(f"the part '{name}' is given twice")
        by_name[name] = part
    return by_name


def _part_string(part: JsonObject, name: str) -> str:
    text = part.get("valueString", part.get("valueCode"))
    if not isinstance(text, str) or not text:
        raise _malformed(f"the '{name}' part needs a valueString")
    return text


def _steps(root: _Node, path: str) -> list[_Step]:
    return _strip_resource_type(_parse_path(path), root.value["resourceType"])


def _exactly_one(nodes: list[_Node]) -> _Node:
    if not nodes:
        raise PatchError("the path matches no element")
    if len(nodes) > 1:
        raise PatchError(f"the path matches {len(nodes)} elements; it must match exactly one")
    return nodes[0]


def _add(root: _Node, operation: _Operation) -> None:
    target = _exactly_one(_select(root, _steps(root, operation.path)))
    container, schema = _container_of(target)
    _attach(container, schema, operation.name(), operation.parts["value"])


def _attach(container: JsonObject, schema: _Schema | None, name: str, value_part: JsonObject) -> None:
    key = _element_key(schema, name, _value_suffix(value_part))
    field_info = schema.fields.get(key) if schema else None
    value = _build_value(value_part, _schema_of(field_info, None))
    _check_shape(key, field_info, value)
    existing = container.get(key)
    repeats = field_info.repeats if field_info else isinstance(existing, list)
    if repeats:
        items = existing if isinstance(existing, list) else ([] if existing is None else [existing])
        container[key] = [*items, value]
        return
    if _occupied(container, schema, key):
        raise PatchError(f"'{name}' already has a value and does not repeat; use replace")
    container[key] = value


def _element_key(schema: _Schema | None, name: str, suffix: str | None) -> str:
    if schema is None or name in schema.fields:
        return name
    if name not in schema.choices:
        raise PatchError(f"'{name}' is not an element of {schema.name}")
    if suffix is None:
        raise _malformed(f"'{name}[x]' is a choice element: give its value as value[x] of a named type")
    key = name + suffix
    if key not in schema.fields:
        raise PatchError(f"{suffix} is not an allowed type for '{name}[x]'")
    return key


def _occupied(container: JsonObject, schema: _Schema | None, key: str) -> bool:
    field_info = schema.fields.get(key) if schema else None
    keys = schema.choices[field_info.choice] if field_info and field_info.choice else (key,)
    return any(sibling in container and not _is_empty(container[sibling]) for sibling in keys)


def _check_shape(key: str, field_info: _Field | None, value: Any) -> None:
    if field_info is None:
        return
    if field_info.model is not None and isinstance(value, _Primitive):
        raise PatchError(f"'{key}' needs a complex value, not a primitive")
    if field_info.model is None and isinstance(value, dict):
        raise PatchError(f"'{key}' is a primitive element and cannot take a complex value")


def _value_suffix(part: JsonObject) -> str | None:
    suffixes = [match.group(1) for key in part if (match := _VALUE_KEY.fullmatch(key))]
    if len(suffixes) > 1:
        raise _malformed("a value part carries more than one value[x]")
    return suffixes[0] if suffixes else None


def _build_value(part: JsonObject, schema: _Schema | None) -> Any:
    suffix = _value_suffix(part)
    if suffix is not None:
        if "part" in part or "resource" in part:
            raise _malformed("a value part has both value[x] and parts")
        return _lift_value(part["value" + suffix], part.get("_value" + suffix))
    if isinstance(part.get("resource"), dict):
        return _lift(part["resource"])
    if isinstance(part.get("part"), list) and part["part"]:
        return _build_complex(part["part"], schema)
    raise _malformed("the value is missing: give value[x], a resource or nested parts")


def _lift_value(raw: Any, shadow: Any) -> Any:
    if raw is None or isinstance(raw, list):
        raise _malformed("value[x] must be a single non-null value")
    if isinstance(raw, dict):
        return _lift(raw)
    return _Primitive(raw, _lift(shadow) if isinstance(shadow, dict) else {})


def _build_complex(parts: list[Any], schema: _Schema | None) -> JsonObject:
    # Anonymous types (Patient.contact, Observation.component) arrive as one part per child element.
    built: JsonObject = {}
    for part in parts:
        name = part.get("name") if isinstance(part, dict) else None
        if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
            raise _malformed(f"a nested value part needs an element name, got {name!r}")
        _attach(built, schema, name, part)
    return built


def _insert(root: _Node, operation: _Operation) -> None:
    container, schema, key = _collection(root, operation)
    items = _list_at(container, key, allow_missing=True)
    index = operation.integer("index")
    if index > len(items):
        raise PatchError(f"index {index} is out of range: the list has {len(items)} items")
    field_info = schema.fields.get(key) if schema else None
    value = _build_value(operation.parts["value"], _schema_of(field_info, None))
    _check_shape(key, field_info, value)
    container[key] = [*items[:index], value, *items[index:]]


def _move(root: _Node, operation: _Operation) -> None:
    container, _, key = _collection(root, operation)
    items = list(_list_at(container, key, allow_missing=False))
    source, destination = operation.integer("source"), operation.integer("destination")
    for name, position in (("source", source), ("destination", destination)):
        if position >= len(items):
            raise PatchError(f"{name} {position} is out of range: the list has {len(items)} items")
    items.insert(destination, items.pop(source))
    container[key] = items


def _collection(root: _Node, operation: _Operation) -> tuple[JsonObject, _Schema | None, str]:
    """The object holding the list that insert/move address, its schema and the list's key."""
    steps = _steps(root, operation.path)
    if not steps or steps[-1][0] != "name":
        raise _malformed(f"'{operation.type}' needs a path that ends with the name of a list")
    parent = _exactly_one(_select(root, steps[:-1]))
    container, schema = _container_of(parent)
    key = steps[-1][1]
    field_info = schema.fields.get(key) if schema else None
    if schema is not None and field_info is None:
        raise PatchError(f"'{key}' is not an element of {schema.name}")
    if field_info is not None and not field_info.repeats:
        raise PatchError(f"'{key}' does not repeat; use add or replace")
    return container, schema, key


def _list_at(container: JsonObject, key: str, allow_missing: bool) -> list[Any]:
    items = container.get(key)
    if items is None and allow_missing:
        return []
    if not isinstance(items, list):
        raise PatchError(f"there is no list '{key}' at the path")
    return items


def _delete(root: _Node, operation: _Operation) -> None:
    nodes = _select(root, _steps(root, operation.path))
    if not nodes:
        return  # the spec: deleting something that is not there is not an error
    target = _exactly_one(nodes)
    if _is_root(target):
        raise PatchError("a patch cannot delete the resource itself")
    if target.index is None:
        del target.holder[target.key]
    else:
        del target.holder[target.key][target.index]


def _replace(root: _Node, operation: _Operation) -> None:
    target = _exactly_one(_select(root, _steps(root, operation.path)))
    if _is_root(target):
        raise PatchError("a patch cannot replace the resource itself")
    part = operation.parts["value"]
    key = _replacement_key(target, _value_suffix(part))
    field_info = target.holder_schema.fields.get(key) if target.holder_schema else None
    value = _build_value(part, _schema_of(field_info, None) or target.schema)
    _check_shape(key, field_info, value)
    if target.index is not None:
        target.holder[key][target.index] = value
    else:
        _put_in_place(target.holder, target.key, key, value)


def _replacement_key(target: _Node, suffix: str | None) -> str:
    # Replacing valueQuantity with a valueString must also rename the key to valueString.
    choice = target.field.choice if target.field else None
    if choice is None or suffix is None:
        return target.key
    return _element_key(target.holder_schema, choice, suffix)


def _put_in_place(holder: JsonObject, old_key: str, new_key: str, value: Any) -> None:
    items = [
        (new_key if key == old_key else key, value if key == old_key else member)
        for key, member in holder.items()
    ]
    holder.clear()
    holder.update(items)


_HANDLERS: dict[str, Callable[[_Node, _Operation], None]] = {
    "add": _add,
    "insert": _insert,
    "delete": _delete,
    "replace": _replace,
    "move": _move,
}
