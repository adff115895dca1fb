"""`$recognition-check` (DOMAIN.md §3): may the result of a prior test replace the one about to be
ordered, and why (not)?

It runs each time a doctor orders a test, so it answers from indexed look-ups only: the catalog
item (by its code or LOINC: one primary-key or index look-up), then one statement for who the
patient is, their results of that item and the grants the caller's checks hold of them (`find`:
the merge table's look-ups, per code one range scan of `recognition_result`'s (patient, system,
code, effective) index, newest first, at most MAX_CANDIDATES, and one of the grants' index),
and the producers' quality records (one query each); the catalog item and the records are kept
for a few seconds (`catalog.CATALOG`, `quality.QUALITY`).
Organizations come from the directory through the cached peer client. It sees every result of the
patient whoever produced it: deciding whether a prior result exists is the point, so it never goes
through a caller-filtered search.

A patient the directory merged (`Patient/$merge`) is one person: the check answers for the surviving
record and finds the results stored under every record merged into it (`results_sharing.merges`).

Each candidate gets the first reason that applies, in this order: `diagnostic-conclusion`,
`not-in-catalog`, `not-final`, `critical-unacknowledged`, `expired`, `no-eqa`, `eqa-lapsed`,
`scope`; otherwise `recognizable`. Recognizable candidates come first, newest first.
"""

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import String, bindparam, case, cast, literal, null, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit import jsonio
from fhirkit.access import HeldGrant, held_grants
from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import InvalidRequest, ResourceNotFound, UnprocessableEntity
from fhirkit.search.values import date_range, format_instant
from fhirkit.store import driver
from results_sharing import access, catalog, db, merges, places, quality
from results_sharing.catalog import CatalogItem
from results_sharing.places import Place
from results_sharing.quality import Standing
from results_sharing.results import DAY_MICROS
from results_sharing.vocabulary import (
    ENCOUNTER_CLASSES,
    FINAL_STATUSES,
    LOINC,
    REASONS,
    RECOGNITION_ITEM,
    RECOGNITION_REASON,
    SCOPE_RANK,
)

MAX_CANDIDATES = 20
NATIONAL_ID = "urn:oid:2.16.156.10011.1.3"


@dataclass(frozen=True)
class Candidate:
    resource_type: str
    resource_id: str
    producer_id: str
    effective: int
    status: str
    critical_open: bool
    diagnostic_conclusion: bool
    mark_label: str | None


@dataclass(frozen=True)
class Verdict:
    candidate: Candidate
    reason: str
    age_days: int
    validity_days: int | None
    expires: int | None

    @property
    def recognizable(self) -> bool:
        return self.reason == "recognizable"


@dataclass(frozen=True)
class CheckRequest:
    patient_id: str  # as named; once `find` ran, the surviving record if it was merged away
    system: str | None
    code: str
    requester: str
    as_of: int
    encounter_class: str | None
    same_person: tuple[str, ...] = ()  # patient_id and the records merged into it (`find`)
    known: bool = True  # False: named by reference, not yet confirmed by the directory (`_require_known`)


def judge(candidate: Candidate, item: CatalogItem | None, standing: Standing, producer: Place, requester: Place,
          as_of: int, encounter_class: str | None) -> Verdict:
    """The reason for one candidate: the rules of DOMAIN.md §3, in the module's order. Pure."""
    age_days = max(0, (as_of - candidate.effective) // DAY_MICROS)
    validity = item.validity_for(encounter_class) if item else None
    expires = candidate.effective + validity * DAY_MICROS if validity else None

    def verdict(reason: str) -> Verdict:
        return Verdict(candidate, reason, age_days, validity, expires)

    if candidate.diagnostic_conclusion:
        return verdict("diagnostic-conclusion")
    if item is None:
        return verdict("not-in-catalog")
    if candidate.status not in FINAL_STATUSES:
        return verdict("not-final")
    if candidate.critical_open:
        return verdict("critical-unacknowledged")
    if expires is not None and as_of > expires:
        return verdict("expired")
    if standing.state == "none":
        return verdict("no-eqa")
    if standing.state == "lapsed":
        return verdict("eqa-lapsed")
    scope = standing.scope or ""
    if SCOPE_RANK[scope] < SCOPE_RANK[item.scope_required] or not places.covers(scope, producer, requester):
        return verdict("scope")
    return verdict("recognizable")


async def recognition_check(call: OperationCall) -> Result:
    directory = call.repo.config.references
    asked = await _check_request(call, directory)
    conn = call.repo.conn
    item = await _item(conn, asked.system, asked.code)
    found = await find(conn, asked, item, grantee=getattr(call.caller, "organization", None) or "")
    request = found.request
    await _require_known(directory, request, found.candidates)
    verdicts = await _judge_all(conn, directory, request, item, found.candidates)
    await access.grant_checked_results(call, request.patient_id, request.requester,
                                       [(v.candidate.resource_type, v.candidate.resource_id) for v in verdicts],
                                       held=found.held)
    return Result(200, jsonio.dumps(answer(request, item, verdicts)))


async def _judge_all(conn: AsyncConnection, directory: Any, request: CheckRequest, item: CatalogItem | None,
                     candidates: list[Candidate]) -> list[Verdict]:
    producers = {c.producer_id for c in candidates}
    records = {p: await quality.records_of(conn, p, item) if item else [] for p in producers}
    requester = await places.place_of(directory, request.requester)
    producer_places = {p: await places.place_of(directory, f"Organization/{p}") for p in sorted(producers)}
    verdicts = [
        judge(c, item, quality.standing_at(records[c.producer_id], c.effective), producer_places[c.producer_id],
              requester, request.as_of, request.encounter_class)
        for c in candidates
    ]
    return sorted(verdicts, key=lambda v: (not v.recognizable, -v.candidate.effective))


async def _item(conn: AsyncConnection, system: str | None, code: str) -> CatalogItem | None:
    if system is not None:
        return await catalog.find_item(conn, system, code)
    # A bare code: a catalog code first, then a LOINC code.
    return await catalog.find_item(conn, RECOGNITION_ITEM, code) or await catalog.find_item(conn, LOINC, code)


@dataclass(frozen=True)
class Found:
    """What a check's one statement read."""

    request: CheckRequest  # with the surviving record and the records merged into it
    candidates: list[Candidate]  # newest first
    held: list[HeldGrant]  # the grants the caller's checks already hold of the person


async def find(conn: AsyncConnection, asked: CheckRequest, item: CatalogItem | None, *, grantee: str) -> Found:
    """Who the named patient is (the surviving record and those merged into it, `merges`), that
    person's latest results of the item (by catalog code or LOINC), whoever produced them, and the
    grants `grantee`'s checks hold of the person: one statement, as every check asks all three."""
    if item is not None:
        wanted = [(RECOGNITION_ITEM, item.code), *([(LOINC, item.loinc)] if item.loinc else [])]
    elif asked.system is not None:
        wanted = [(asked.system, asked.code)]
    else:
        wanted = [(RECOGNITION_ITEM, asked.code), (LOINC, asked.code)]
    values: dict[str, Any] = {"b_patient": asked.patient_id, "b_as_of": asked.as_of, "b_grantee": grantee,
                              "b_scope": access.RESULTS_SCOPE, "b_source": access.check_source(grantee)}
    for j, (system, code) in enumerate(wanted):
        values.update({f"b_system{j}": system, f"b_code{j}": code})
    survivor, merged, results, held = asked.patient_id, [], [], []
    for kind, *row in await driver.execute(conn, _check_statement(len(wanted)), values):
        if kind == _SURVIVOR:
            survivor = row[0]
        elif kind == _MERGED:
            merged.append(row[0])
        elif kind == _GRANT:
            held.append((int(row[2]), row[0], row[1], row[3]))
        else:
            results.append(row)
    request = replace(asked, patient_id=survivor, same_person=(survivor, *sorted(merged)))
    return Found(request, _newest(results), held)


def _newest(results: list[list[Any]]) -> list[Candidate]:
    """The newest MAX_CANDIDATES results, each once (a result is stored under each of its codes)."""
    results.sort(key=lambda row: -row[3])  # a UNION promises no order
    candidates: dict[tuple[str, str], Candidate] = {}
    for row in results:
        # bool(): SQLite hands booleans back as 0 and 1 on the driver.
        candidates.setdefault((row[0], row[1]), Candidate(*row[:5], bool(row[5]), bool(row[6]), row[7]))
    return list(candidates.values())[:MAX_CANDIDATES]


# codes → the check's statement, built once: building it per check cost more than running it.
# Its rows are (kind, …): the surviving record's id, the ids merged into it, the results
# (`Candidate`'s fields, in order) and the grants held (type, id, gid as text, expiry: a UNION's
# columns share their types).
_SURVIVOR, _MERGED, _RESULT, _GRANT = "survivor", "merged", "result", "grant"
_CANDIDATE_COLUMNS = ("resource_type", "resource_id", "producer_id", "effective", "status", "critical_open",
                      "diagnostic_conclusion", "mark_label")
_CHECKS: dict[int, Any] = {}


def _check_statement(codes: int) -> Any:
    statement = _CHECKS.get(codes)
    if statement is None:
        person = merges.same_person(bindparam("b_patient"))
        people = select(case((person.c.survivor, literal(_SURVIVOR)), else_=literal(_MERGED)), person.c.patient_id,
                        *_padding(1))
        results = [select(literal(_RESULT), *found.c) for found in _results(person, codes)]
        grants = held_grants(select(person.c.patient_id).where(person.c.survivor).scalar_subquery()).subquery()
        held = select(literal(_GRANT), grants.c.target_type, grants.c.target_id, cast(grants.c.gid, String),
                      grants.c.expires_at, *_padding(4))
        statement = _CHECKS[codes] = union_all(people, *results, held)
    return statement


def _padding(columns: int) -> list[Any]:
    """NULLs for the candidate columns a UNION branch of `columns` others does not fill."""
    return [null()] * (len(_CANDIDATE_COLUMNS) - columns)


def _results(person: Any, codes: int) -> list[Any]:
    """The person's newest results of each code, one subquery per code: each is a range scan of
    the (patient, system, code, effective) index per record of the person. (Codes ORed in one
    query let PostgreSQL use only the patient of that index and read all of their results.)"""
    r = db.result.c
    return [
        select(*(r[name] for name in _CANDIDATE_COLUMNS))
        .where(r.patient_id.in_(select(person.c.patient_id)), r.system == bindparam(f"b_system{j}"),
               r.code == bindparam(f"b_code{j}"), r.effective <= bindparam("b_as_of"))
        .order_by(r.effective.desc())
        .limit(MAX_CANDIDATES * codes)
        .subquery(f"results{j}")
        for j in range(codes)
    ]


def answer(request: CheckRequest, item: CatalogItem | None, verdicts: list[Verdict]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": "recognizable", "valueBoolean": any(v.recognizable for v in verdicts)},
        {"name": "patient", "valueReference": {"reference": f"Patient/{request.patient_id}"}},
        {"name": "requester", "valueReference": {"reference": request.requester}},
        {"name": "asOf", "valueDateTime": format_instant(request.as_of)},
    ]
    if item is not None:
        parameters.append({"name": "item", "valueCoding": item.coding()})
    else:
        parameters.append({"name": "reason", "valueCoding": _reason("not-in-catalog")})
    parameters += [{"name": "candidate", "part": _candidate_parts(v)} for v in verdicts]
    return {"resourceType": "Parameters", "parameter": parameters}


def _candidate_parts(verdict: Verdict) -> list[dict[str, Any]]:
    candidate = verdict.candidate
    parts: list[dict[str, Any]] = [
        {"name": "result", "valueReference": {"reference": f"{candidate.resource_type}/{candidate.resource_id}"}},
        {"name": "producer", "valueReference": {"reference": f"Organization/{candidate.producer_id}"}},
    ]
    if candidate.mark_label:
        parts.append({"name": "mark", "valueString": candidate.mark_label})
    parts += [
        {"name": "recognizable", "valueBoolean": verdict.recognizable},
        {"name": "reason", "valueCoding": _reason(verdict.reason)},
        {"name": "effective", "valueDateTime": format_instant(candidate.effective)},
        {"name": "status", "valueCode": candidate.status},
        {"name": "age-days", "valueInteger": verdict.age_days},
    ]
    if verdict.validity_days is not None and verdict.expires is not None:
        parts += [{"name": "validity-days", "valueInteger": verdict.validity_days},
                  {"name": "expires", "valueDateTime": format_instant(verdict.expires)}]
    return parts


def _reason(code: str) -> dict[str, Any]:
    return {"system": RECOGNITION_REASON, "code": code, "display": REASONS[code]}


# --- parameters -------------------------------------------------------------------------------

async def _check_request(call: OperationCall, directory: Any) -> CheckRequest:
    system, code = _code(call.parameter("code"))
    requester = _requester(call)
    as_of = _as_of(call)
    encounter_class = _encounter_class(call.parameter("encounter-class"))
    patient_id, known = await _patient(call.parameter("patient"), directory)
    return CheckRequest(patient_id, system, code, requester, as_of, encounter_class, known=known)


async def _require_known(directory: Any, request: CheckRequest, candidates: list[Candidate]) -> None:
    """A patient named by reference is known if results of it are stored here (each was checked
    against the directory as it was stored) or the directory merged records into it; only one
    with neither is asked of the directory, so that a mistyped reference is 404, not "no prior
    result". Most checks are for a patient not asked about in the last 30 s (the peer client's
    cache): the directory's answer was a request and a statement of every such check."""
    if request.known or candidates or len(request.same_person) > 1:
        return
    if not await directory.exists("Patient", request.patient_id):
        raise ResourceNotFound(f"Patient/{request.patient_id[:64]} is not known to the directory")


async def _patient(value: Any, directory: Any) -> tuple[str, bool]:
    """The patient's id, and whether the directory has vouched for it already (an identifier is
    looked up there; a reference is confirmed later, only if needed: `_require_known`)."""
    if isinstance(value, dict) and "reference" in value:
        value = value["reference"]
    if isinstance(value, str) and value.startswith("Patient/"):
        return value.split("/", 1)[1], False
    identifier = _identifier(value)
    if identifier is None:
        raise InvalidRequest("patient is required: a Patient reference, or an identifier such as the national ID "
                             f"({NATIONAL_ID}|<18 characters>)")
    matches = await directory.search("Patient", [("identifier", f"{identifier[0]}|{identifier[1]}"), ("_count", "5")])
    if not matches:
        raise ResourceNotFound(f"No patient has identifier {identifier[0]}|{identifier[1][:40]}")
    # After a merge both records carry the identifier: the merged-away one names its survivor.
    people = {merges.replaced_by(match) or str(match["id"]) for match in matches}
    if len(people) > 1:
        raise UnprocessableEntity(f"Identifier {identifier[0]}|{identifier[1][:40]} names several patients; "
                                  "give the Patient reference")
    return people.pop(), True


def _identifier(value: Any) -> tuple[str, str] | None:
    if isinstance(value, dict) and value.get("system") and value.get("value"):
        return str(value["system"]), str(value["value"])
    if isinstance(value, str) and "|" in value:
        system, _, text = value.rpartition("|")
        if system and text:
            return system, text
    return None


def _code(value: Any) -> tuple[str | None, str]:
    if isinstance(value, dict) and isinstance(value.get("code"), str):
        return value.get("system"), value["code"]
    if isinstance(value, str) and value:
        system, _, code = value.rpartition("|")
        return (system or None), code
    raise InvalidRequest("code is required: the Coding of the test about to be ordered (a catalog code or LOINC)")


def _requester(call: OperationCall) -> str:
    value = call.parameter("requester")
    if isinstance(value, dict):
        value = value.get("reference")
    requester = value if value is not None else getattr(call.caller, "organization", None)
    if not isinstance(requester, str) or not requester.startswith("Organization/"):
        raise InvalidRequest("requester must be an Organization reference")
    return requester


def _as_of(call: OperationCall) -> int:
    value = call.parameter("asOf")
    if value is None:
        return call.repo.config.clock()
    bounds = date_range(value) if isinstance(value, str) else None
    if bounds is None:
        raise InvalidRequest("asOf must be a FHIR dateTime")
    return bounds[1] if len(value) <= 10 else bounds[0]  # a bare date means the end of that day


def _encounter_class(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("code")
    if value is None:
        return None
    if value not in ENCOUNTER_CLASSES:
        raise InvalidRequest(f"encounter-class must be one of {', '.join(ENCOUNTER_CLASSES)}")
    return str(value)
