"""Patient operations of the master patient index.

* `Patient/$match` (IHE PDQm): candidates come from a few indexed searches (national ID, other
  identifiers, family name + birth date, phone, full name), never from a scan; each is scored and
  graded with the `match-grade` extension, sure matches first.
* `Patient/$ihe-pix` (IHE PIXm): give one identifier, get the person's other identifiers.
* `Patient/$merge`: two records of one person become one; the merged-away record stays, inactive,
  with `link.type = replaced-by`, so nothing is lost and every identifier stays findable.
"""

from dataclasses import dataclass
from typing import Any

import orjson

from directory import identifiers, patients
from fhirkit.api import responses
from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import BusinessRuleViolation, InvalidRequest, ResourceNotFound
from fhirkit.search.request import parse_search
from fhirkit.store.repository import Repository, StoredResource

MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"
CANDIDATES_PER_QUERY = 50
DEFAULT_COUNT = 10


@dataclass
class Scored:
    stored: StoredResource
    score: float
    grade: str


# --- $match --------------------------------------------------------------------------------------


async def patient_match(call: OperationCall) -> Result:
    query = call.parameter("resource")
    if not isinstance(query, dict) or query.get("resourceType") != "Patient":
        raise InvalidRequest("$match needs a 'resource' parameter holding a Patient", expression=["Parameters.parameter"])
    count = _count(call.parameter("count"))
    only_certain = call.parameter("onlyCertainMatches") in (True, "true")
    candidates = await _candidates(call.repo, query)
    scored = [s for s in (_score(query, c) for c in candidates) if s.grade != "certainly-not"]
    if only_certain:
        scored = [s for s in scored if s.grade == "certain"]
    scored.sort(key=lambda s: (-s.score, s.stored.resource_id))
    entries = [_match_entry(s, call.options.base) for s in scored[:count]]
    return Result(200, responses.bundle_bytes("searchset", entries, total=len(entries)))


def _count(value: Any) -> int:
    if value is None:
        return DEFAULT_COUNT
    try:
        return max(1, min(int(value), 100))
    except (TypeError, ValueError):
        raise InvalidRequest("$match 'count' must be an integer") from None


async def _candidates(repo: Repository, query: dict[str, Any]) -> list[StoredResource]:
    searches: list[list[tuple[str, str]]] = []
    for identifier in query.get("identifier") or []:
        if identifier.get("value"):
            system = identifier.get("system") or ""
            searches.append([("identifier", f"{system}|{identifier['value']}" if system else identifier["value"])])
    for name in query.get("name") or []:
        family = name.get("family")
        if family and query.get("birthDate"):
            searches.append([("family", family), ("birthdate", query["birthDate"])])
        full = _full_names(name)
        for text in full:
            searches.append([("name", text)])
    for telecom in query.get("telecom") or []:
        if telecom.get("value"):
            searches.append([("telecom", telecom["value"])])
    found: dict[str, StoredResource] = {}
    for params in searches:
        request = parse_search("Patient", [*params, ("_count", str(CANDIDATES_PER_QUERY))])
        request.total = "none"
        for stored in (await repo.search(request)).matches:
            found.setdefault(stored.resource_id, stored)
    return list(found.values())


def _full_names(name: dict[str, Any]) -> set[str]:
    names = set()
    if isinstance(name.get("text"), str) and name["text"].strip():
        names.add(name["text"].strip())
    given = "".join(g for g in name.get("given") or [] if isinstance(g, str))
    if isinstance(name.get("family"), str):
        names.add(name["family"] + given)
    return {n for n in names if n}


def _score(query: dict[str, Any], stored: StoredResource) -> Scored:
    candidate = stored.parsed()
    wanted_id = _national_id(query)
    have_id = _national_id(candidate)
    if wanted_id and have_id:
        grade = "certain" if wanted_id == have_id else "certainly-not"
        return Scored(stored, 1.0 if grade == "certain" else 0.0, grade)
    score = 0.0
    if _shares_identifier(query, candidate):
        score += 0.5
    if _names(query) & _names(candidate):
        score += 0.35
    elif _families(query) & _families(candidate):
        score += 0.15
    if query.get("birthDate") and query.get("birthDate") == candidate.get("birthDate"):
        score += 0.3
    if query.get("gender") and query.get("gender") == candidate.get("gender"):
        score += 0.05
    elif query.get("gender") and candidate.get("gender") and query["gender"] != candidate["gender"]:
        score -= 0.3
    if _phones(query) & _phones(candidate):
        score += 0.2
    score = round(max(0.0, min(score, 0.99)), 2)
    grade = "probable" if score >= 0.8 else "possible" if score >= 0.4 else "certainly-not"
    return Scored(stored, score, grade)


def _national_id(patient: dict[str, Any]) -> str | None:
    found = patients.national_ids(patient)
    return identifiers.normalize_national_id(found[0][1]) if found else None


def _shares_identifier(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def keys(p: dict[str, Any]) -> set[tuple[str, str]]:
        return {(i.get("system", ""), i.get("value", "")) for i in p.get("identifier") or [] if i.get("value")}

    return bool(keys(a) & keys(b))


def _names(patient: dict[str, Any]) -> set[str]:
    return {n.replace(" ", "").casefold() for name in patient.get("name") or [] for n in _full_names(name)}


def _families(patient: dict[str, Any]) -> set[str]:
    return {name["family"] for name in patient.get("name") or [] if isinstance(name.get("family"), str)}


def _phones(patient: dict[str, Any]) -> set[str]:
    return {"".join(ch for ch in t.get("value", "") if ch.isdigit()) for t in patient.get("telecom") or []
            if t.get("system") in (None, "phone", "sms") and t.get("value")}


def _match_entry(scored: Scored, base: str) -> bytes:
    search = {
        "extension": [{"url": MATCH_GRADE, "valueCode": scored.grade}],
        "mode": "match",
        "score": scored.score,
    }
    entry = responses.entry_bytes(scored.stored, base)
    return entry[:-1] + b',"search":' + orjson.dumps(search) + b"}"


# --- $ihe-pix ------------------------------------------------------------------------------------


async def patient_ihe_pix(call: OperationCall) -> Result:
    source = call.parameter("sourceIdentifier")
    if not isinstance(source, str) or "|" not in source:
        raise InvalidRequest("$ihe-pix needs sourceIdentifier=system|value")
    targets = [value for key, value in call.params if key == "targetSystem"]
    stored = await _by_identifier(call.repo, source)
    people = [stored.parsed()]
    replaced_by = _link(people[0], "replaced-by")
    if replaced_by:
        people.append((await call.repo.read("Patient", replaced_by)).parsed())
    output: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = {tuple(source.split("|", 1))}  # type: ignore[arg-type]
    for person in people:
        for identifier in person.get("identifier") or []:
            key = (identifier.get("system", ""), identifier.get("value", ""))
            if key in seen or (targets and key[0] not in targets):
                continue
            seen.add(key)
            output.append({"name": "targetIdentifier", "valueIdentifier": identifier})
        output.append({"name": "targetId", "valueReference": {"reference": f"Patient/{person['id']}"}})
    return Result(200, orjson.dumps({"resourceType": "Parameters", "parameter": output}))


async def _by_identifier(repo: Repository, token: str) -> StoredResource:
    request = parse_search("Patient", [("identifier", token), ("_count", "5")])
    request.total = "none"
    matches = (await repo.search(request)).matches
    live = [m for m in matches if not patients.is_replaced(m.parsed())]
    chosen = live or matches
    if not chosen:
        raise ResourceNotFound(f"No Patient has identifier {token[:120]}")
    return chosen[0]


def _link(patient: dict[str, Any], link_type: str) -> str | None:
    for link in patient.get("link") or []:
        reference = (link.get("other") or {}).get("reference", "")
        if link.get("type") == link_type and reference.startswith("Patient/"):
            return reference.split("/", 1)[1]
    return None


# --- $merge --------------------------------------------------------------------------------------


async def patient_merge(call: OperationCall) -> Result:
    source_id = _patient_id(call.parameter("source-patient"), "source-patient")
    target_id = _patient_id(call.parameter("target-patient"), "target-patient")
    if source_id == target_id:
        raise BusinessRuleViolation("source-patient and target-patient are the same record")
    source = (await call.repo.read("Patient", source_id)).parsed()
    target = (await call.repo.read("Patient", target_id)).parsed()
    for label, patient in (("source", source), ("target", target)):
        if patients.is_replaced(patient):
            raise BusinessRuleViolation(f"The {label} Patient/{patient['id']} was already merged into another record")
    _refuse_conflicting_national_ids(source, target)
    retired = {**source, "active": False, "link": [*(source.get("link") or []),
               {"other": {"reference": f"Patient/{target_id}"}, "type": "replaced-by"}]}
    merged = {**target, "identifier": _union(target.get("identifier"), source.get("identifier")),
              "link": [*(target.get("link") or []), {"other": {"reference": f"Patient/{source_id}"}, "type": "replaces"}]}
    for key in ("telecom", "address"):
        if source.get(key) or target.get(key):
            merged[key] = _union(target.get(key), source.get(key))
    if call.parameter("preview") in (True, "true"):
        return Result(200, _merge_output(call, merged, "Preview: nothing was changed"))
    await call.repo.update("Patient", source_id, retired)  # releases the national ID first
    outcome = await call.repo.update("Patient", target_id, merged)
    result = outcome.stored.parsed()
    return Result(200, _merge_output(call, result, f"Patient/{source_id} merged into Patient/{target_id}"))


def _patient_id(value: Any, name: str) -> str:
    reference = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(reference, str) or not reference.startswith("Patient/") or len(reference) <= 8:
        raise InvalidRequest(f"$merge needs '{name}' as a Patient reference")
    return reference.split("/", 2)[1]


def _refuse_conflicting_national_ids(source: dict[str, Any], target: dict[str, Any]) -> None:
    a, b = _national_id(source), _national_id(target)
    if a and b and a != b:
        raise BusinessRuleViolation(
            "The two records carry different national IDs: they are two people, not one"
        )


def _union(first: list[Any] | None, second: list[Any] | None) -> list[Any]:
    out = list(first or [])
    for item in second or []:
        if item not in out:
            out.append(item)
    return out


def _merge_output(call: OperationCall, result: dict[str, Any], message: str) -> bytes:
    return orjson.dumps({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "outcome", "resource": {"resourceType": "OperationOutcome", "issue": [
                {"severity": "information", "code": "informational", "diagnostics": message}]}},
            {"name": "result", "resource": result},
        ],
    })
