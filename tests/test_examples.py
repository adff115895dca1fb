"""Every official R4 example (except OperationOutcome) is stored through the gateway with its own
id (update-as-create), read back unchanged, and found by its main search parameters.

Loading order: an example is stored after the examples it refers to. Two things need
placeholders first (minimal valid resources with the referenced id): references to resources of a
held type that no example provides, and references that close a cycle between examples (the
target is stored as a placeholder, then overwritten by its real content). References to types
the product does not hold (Group, Medication, MolecularSequence, ...) are kept as they are.

The expected search values are read from each example here, with paths written out per type
below (not with the engine's own extraction), so that the engine's index is checked against an
independent reading of the example.
"""

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from servicekit.topology import ALL_TYPES

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "fhir-r4-examples"
pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason=f"{EXAMPLES} is not there")

Key = tuple[str, str]  # (resource type, id)

# ------------------------------------------------------------------------------ placeholders

ANCHOR: Key = ("Patient", "example-placeholder-anchor")  # what placeholders' required references use
ANCHOR_REF = {"reference": f"{ANCHOR[0]}/{ANCHOR[1]}"}
CODE = {"text": "placeholder"}

# A minimal valid resource of every held type (required elements only).
PLACEHOLDERS: dict[str, dict[str, Any]] = {
    "Patient": {}, "Organization": {}, "Practitioner": {}, "PractitionerRole": {}, "Location": {},
    "HealthcareService": {}, "Device": {}, "Specimen": {}, "SupplyDelivery": {}, "CareTeam": {},
    "Endpoint": {"status": "active", "connectionType": {"code": "hl7-fhir-rest"}, "payloadType": [CODE],
                 "address": "http://example.org/fhir"},
    "ServiceRequest": {"status": "active", "intent": "order", "subject": ANCHOR_REF},
    "Task": {"status": "requested", "intent": "order"},
    "Provenance": {"target": [ANCHOR_REF], "recorded": "2020-01-01T00:00:00Z", "agent": [{"who": ANCHOR_REF}]},
    "Condition": {"subject": ANCHOR_REF},
    "Encounter": {"status": "finished", "class": {"code": "AMB"}},
    "EpisodeOfCare": {"status": "active", "patient": ANCHOR_REF},
    "CarePlan": {"status": "active", "intent": "plan", "subject": ANCHOR_REF},
    "Observation": {"status": "final", "code": CODE},
    "DiagnosticReport": {"status": "final", "code": CODE},
    "ImagingStudy": {"status": "available", "subject": ANCHOR_REF},
    "Media": {"status": "completed", "content": {"contentType": "image/png"}},
    "DocumentReference": {"status": "current", "content": [{"attachment": {"contentType": "text/plain"}}]},
    "Composition": {"status": "final", "type": CODE, "date": "2020-01-01", "author": [ANCHOR_REF],
                    "title": "placeholder"},
    "Binary": {"contentType": "text/plain"},
    "Bundle": {"type": "collection"},
    "Procedure": {"status": "completed", "subject": ANCHOR_REF},
    "SupplyRequest": {"quantity": {"value": 1}, "itemCodeableConcept": CODE},
    "DetectedIssue": {"status": "final"},
    "Flag": {"status": "active", "code": CODE, "subject": ANCHOR_REF},
    "CodeSystem": {"status": "active", "content": "not-present"},
    "ValueSet": {"status": "active"},
    "ConceptMap": {"status": "active"},
    "VerificationResult": {"status": "attested"},
    "Appointment": {"status": "proposed", "participant": [{"actor": ANCHOR_REF, "status": "needs-action"}]},
    "AppointmentResponse": {"appointment": {"reference": "Appointment/example-placeholder-appointment"},
                            "participantStatus": "accepted"},
    "Schedule": {"actor": [ANCHOR_REF]},
    "Slot": {"schedule": {"reference": "Schedule/example-placeholder-schedule"}, "status": "free",
             "start": "2020-01-01T08:00:00Z", "end": "2020-01-01T08:30:00Z"},
    "Communication": {"status": "completed"},
    "CommunicationRequest": {"status": "active"},
    "AuditEvent": {"type": {"code": "rest"}, "recorded": "2020-01-01T00:00:00Z", "agent": [{"requestor": True}],
                   "source": {"observer": ANCHOR_REF}},
    "Subscription": {"status": "off", "reason": "placeholder", "criteria": "Patient?_id=x",
                     "channel": {"type": "rest-hook", "endpoint": "https://example.org/hook"}},
    "SubscriptionTopic": {"url": "http://example.org/SubscriptionTopic/placeholder", "status": "draft"},
    "Consent": {"status": "active", "scope": CODE, "category": [CODE]},
}
# Placeholders that placeholders point at, stored first, in this order.
PLACEHOLDER_BASES: list[Key] = [
    ANCHOR,
    ("Appointment", "example-placeholder-appointment"),
    ("Schedule", "example-placeholder-schedule"),
]

# ---------------------------------------------------------------------- main search parameters

# type → "param:path:kind ..."; `a[x]` is the choice element a, `ext(url)` an extension's value.
SEARCHES_TEXT = {
    "Patient": "identifier:identifier:token family:name.family:string given:name.given:string "
    "birthdate:birthDate:date gender:gender:token organization:managingOrganization:reference "
    "general-practitioner:generalPractitioner:reference telecom:telecom:token address-city:address.city:string "
    "active:active:token link:link.other:reference",
    "Practitioner": "identifier:identifier:token family:name.family:string given:name.given:string "
    "gender:gender:token active:active:token address-city:address.city:string telecom:telecom:token",
    "PractitionerRole": "identifier:identifier:token practitioner:practitioner:reference "
    "organization:organization:reference role:code:token specialty:specialty:token location:location:reference "
    "service:healthcareService:reference active:active:token date:period:date",
    "Organization": "identifier:identifier:token name:name:string type:type:token partof:partOf:reference "
    "active:active:token address-city:address.city:string endpoint:endpoint:reference",
    "Location": "identifier:identifier:token name:name:string status:status:token type:type:token "
    "organization:managingOrganization:reference partof:partOf:reference address-city:address.city:string "
    "endpoint:endpoint:reference operational-status:operationalStatus:token",
    "HealthcareService": "identifier:identifier:token name:name:string organization:providedBy:reference "
    "location:location:reference service-category:category:token service-type:type:token active:active:token "
    "endpoint:endpoint:reference specialty:specialty:token program:program:token",
    "Endpoint": "identifier:identifier:token name:name:string status:status:token "
    "connection-type:connectionType:token organization:managingOrganization:reference payload-type:payloadType:token",
    "ServiceRequest": "identifier:identifier:token code:code:token subject:subject:reference status:status:token "
    "intent:intent:token requester:requester:reference performer:performer:reference authored:authoredOn:date "
    "category:category:token encounter:encounter:reference based-on:basedOn:reference specimen:specimen:reference "
    "occurrence:occurrence[x]:date priority:priority:token body-site:bodySite:token replaces:replaces:reference "
    "requisition:requisition:token performer-type:performerType:token",
    "Task": "identifier:identifier:token status:status:token intent:intent:token code:code:token subject:for:reference "
    "owner:owner:reference requester:requester:reference focus:focus:reference authored-on:authoredOn:date "
    "modified:lastModified:date part-of:partOf:reference based-on:basedOn:reference "
    "business-status:businessStatus:token priority:priority:token performer:performerType:token "
    "encounter:encounter:reference group-identifier:groupIdentifier:token period:executionPeriod:date",
    "Condition": "identifier:identifier:token code:code:token subject:subject:reference "
    "clinical-status:clinicalStatus:token verification-status:verificationStatus:token category:category:token "
    "onset-date:onset[x]:date encounter:encounter:reference asserter:asserter:reference severity:severity:token "
    "body-site:bodySite:token recorded-date:recordedDate:date evidence:evidence.code:token "
    "evidence-detail:evidence.detail:reference stage:stage.summary:token",
    "Encounter": "identifier:identifier:token status:status:token class:class:token type:type:token "
    "subject:subject:reference participant:participant.individual:reference date:period:date "
    "service-provider:serviceProvider:reference location:location.location:reference "
    "episode-of-care:episodeOfCare:reference reason-code:reasonCode:token part-of:partOf:reference "
    "based-on:basedOn:reference diagnosis:diagnosis.condition:reference special-arrangement:hospitalization.specialArrangement:token",
    "EpisodeOfCare": "identifier:identifier:token status:status:token type:type:token patient:patient:reference "
    "organization:managingOrganization:reference date:period:date care-manager:careManager:reference "
    "condition:diagnosis.condition:reference incoming-referral:referralRequest:reference",
    "CareTeam": "identifier:identifier:token status:status:token subject:subject:reference category:category:token "
    "participant:participant.member:reference date:period:date encounter:encounter:reference",
    "Observation": "identifier:identifier:token code:code:token subject:subject:reference status:status:token "
    "category:category:token date:effective[x]:date value-quantity:valueQuantity:quantity "
    "performer:performer:reference specimen:specimen:reference based-on:basedOn:reference "
    "has-member:hasMember:reference derived-from:derivedFrom:reference device:device:reference "
    "encounter:encounter:reference value-concept:valueCodeableConcept:token value-string:valueString:string "
    "method:method:token focus:focus:reference part-of:partOf:reference data-absent-reason:dataAbsentReason:token "
    "component-code:component.code:token "
    "gene-identifier:ext(http://hl7.org/fhir/StructureDefinition/observation-geneticsGene):token "
    "dna-variant:ext(http://hl7.org/fhir/StructureDefinition/observation-geneticsDnaVariant):string "
    "amino-acid-change:ext(http://hl7.org/fhir/StructureDefinition/observation-geneticsAminoAcidChangeName):string",
    "DiagnosticReport": "identifier:identifier:token code:code:token subject:subject:reference status:status:token "
    "category:category:token date:effective[x]:date issued:issued:date performer:performer:reference "
    "result:result:reference specimen:specimen:reference based-on:basedOn:reference conclusion:conclusionCode:token "
    "encounter:encounter:reference results-interpreter:resultsInterpreter:reference media:media.link:reference "
    "assessed-condition:ext(http://hl7.org/fhir/StructureDefinition/DiagnosticReport-geneticsAssessedCondition):reference",
    "ImagingStudy": "identifier:identifier:token status:status:token subject:subject:reference started:started:date "
    "modality:series.modality:token endpoint:endpoint:reference basedon:basedOn:reference "
    "interpreter:interpreter:reference referrer:referrer:reference encounter:encounter:reference "
    "bodysite:series.bodySite:token instance:series.instance.uid:token series:series.uid:token "
    "reason:reasonCode:token performer:series.performer.actor:reference",
    "Specimen": "identifier:identifier:token accession:accessionIdentifier:token type:type:token "
    "subject:subject:reference status:status:token collected:collection.collected[x]:date parent:parent:reference "
    "collector:collection.collector:reference container-id:container.identifier:token "
    "bodysite:collection.bodySite:token container:container.type:token",
    "Media": "identifier:identifier:token status:status:token subject:subject:reference type:type:token "
    "modality:modality:token created:created[x]:date operator:operator:reference device:device:reference "
    "view:view:token based-on:basedOn:reference encounter:encounter:reference site:bodySite:token",
    "DocumentReference": "identifier:identifier:token status:status:token subject:subject:reference type:type:token "
    "category:category:token author:author:reference date:date:date custodian:custodian:reference "
    "contenttype:content.attachment.contentType:token encounter:context.encounter:reference "
    "period:context.period:date facility:context.facilityType:token setting:context.practiceSetting:token "
    "authenticator:authenticator:reference description:description:string relatesto:relatesTo.target:reference "
    "security-label:securityLabel:token event:context.event:token related:context.related:reference "
    "language:content.attachment.language:token location:content.attachment.url:uri format:content.format:token",
    "Bundle": "identifier:identifier:token type:type:token timestamp:timestamp:date",
    "Binary": "",
    "Procedure": "identifier:identifier:token code:code:token subject:subject:reference status:status:token "
    "date:performed[x]:date performer:performer.actor:reference category:category:token "
    "based-on:basedOn:reference reason-code:reasonCode:token location:location:reference "
    "encounter:encounter:reference part-of:partOf:reference reason-reference:reasonReference:reference",
    "Device": "identifier:identifier:token status:status:token type:type:token patient:patient:reference "
    "organization:owner:reference manufacturer:manufacturer:string model:modelNumber:string "
    "location:location:reference url:url:uri device-name:deviceName.name:string",
    "Appointment": "identifier:identifier:token status:status:token service-type:serviceType:token "
    "actor:participant.actor:reference date:start:date appointment-type:appointmentType:token "
    "specialty:specialty:token slot:slot:reference reason-code:reasonCode:token "
    "service-category:serviceCategory:token based-on:basedOn:reference part-status:participant.status:token",
    "AppointmentResponse": "identifier:identifier:token appointment:appointment:reference actor:actor:reference "
    "part-status:participantStatus:token",
    "Schedule": "identifier:identifier:token actor:actor:reference active:active:token "
    "service-type:serviceType:token specialty:specialty:token date:planningHorizon:date "
    "service-category:serviceCategory:token",
    "Slot": "identifier:identifier:token schedule:schedule:reference status:status:token start:start:date "
    "service-type:serviceType:token specialty:specialty:token appointment-type:appointmentType:token "
    "service-category:serviceCategory:token",
    "Communication": "identifier:identifier:token status:status:token subject:subject:reference "
    "category:category:token sender:sender:reference recipient:recipient:reference sent:sent:date "
    "received:received:date based-on:basedOn:reference part-of:partOf:reference encounter:encounter:reference "
    "medium:medium:token",
    "CommunicationRequest": "identifier:identifier:token status:status:token subject:subject:reference "
    "category:category:token requester:requester:reference recipient:recipient:reference "
    "authored:authoredOn:date priority:priority:token encounter:encounter:reference sender:sender:reference "
    "occurrence:occurrence[x]:date based-on:basedOn:reference replaces:replaces:reference "
    "group-identifier:groupIdentifier:token medium:medium:token",
    "AuditEvent": "type:type:token subtype:subtype:token action:action:token date:recorded:date "
    "agent:agent.who:reference entity:entity.what:reference outcome:outcome:token site:source.site:string "
    "source:source.observer:reference altid:agent.altId:token agent-name:agent.name:string "
    "entity-name:entity.name:string policy:agent.policy:uri agent-role:agent.role:token "
    "entity-type:entity.type:token entity-role:entity.role:token address:agent.network.address:string",
    "Consent": "identifier:identifier:token status:status:token patient:patient:reference scope:scope:token "
    "category:category:token date:dateTime:date organization:organization:reference "
    "action:provision.action:token actor:provision.actor.reference:reference consentor:performer:reference "
    "source-reference:source[x]:reference period:provision.period:date purpose:provision.purpose:token "
    "security-label:provision.securityLabel:token data:provision.data.reference:reference",
    "Provenance": "target:target:reference recorded:recorded:date agent:agent.who:reference "
    "entity:entity.what:reference location:location:reference agent-type:agent.type:token "
    "agent-role:agent.role:token signature-type:signature.type:token",
    "Subscription": "status:status:token type:channel.type:token url:channel.endpoint:uri "
    "criteria:criteria:string contact:contact:token payload:channel.payload:token",
}


@dataclass(frozen=True)
class MainParameter:
    name: str
    path: str
    kind: str


def _parse_searches() -> dict[str, list[MainParameter]]:
    parsed: dict[str, list[MainParameter]] = {}
    for resource_type, text in SEARCHES_TEXT.items():
        items = []
        for item in text.split():
            name, rest = item.split(":", 1)
            path, kind = rest.rsplit(":", 1)
            items.append(MainParameter(name, path, kind))
        parsed[resource_type] = items
    return parsed


SEARCHES = _parse_searches()

# ----------------------------------------------------------------------------- reading examples


def _number(text: str) -> tuple[str, str]:
    return ("number", text)


def parse_exact(raw: bytes) -> Any:
    """JSON with every number kept as its text (a tuple, never equal to a string or a list), so a
    comparison also catches `1.50` read back as `1.5` or `5` as `"5"`."""
    return json.loads(raw, parse_float=_number, parse_int=_number)


@dataclass
class Example:
    file: str
    raw: bytes
    content: dict[str, Any]
    references: set[Key] = field(default_factory=set)

    @property
    def key(self) -> Key:
        return self.content["resourceType"], self.content["id"]


def load_examples() -> dict[Key, Example]:
    examples: dict[Key, Example] = {}
    for path in sorted(EXAMPLES.glob("*.json")):
        raw = path.read_bytes()
        content = json.loads(raw)
        if content["resourceType"] == "OperationOutcome":
            continue
        example = Example(path.name, raw, content)
        example.references = set(held_references(content))
        assert example.key not in examples, f"{path.name} repeats {example.key}"
        examples[example.key] = example
    return examples


def held_references(resource: dict[str, Any]) -> Iterator[Key]:
    """(type, id) of every literal relative reference to a held type, outside a Bundle's entries
    (those resolve inside the Bundle, not on this server)."""
    for reference in _reference_strings(resource, inside_bundle=resource["resourceType"] == "Bundle"):
        key = relative_target(reference)
        if key is not None and key[0] in ALL_TYPES and key != (resource["resourceType"], resource.get("id")):
            yield key


def _reference_strings(value: Any, *, inside_bundle: bool) -> Iterator[str]:
    if isinstance(value, dict):
        if isinstance(value.get("reference"), str):
            yield value["reference"]
        for key, child in value.items():
            if inside_bundle and key == "resource":
                continue
            yield from _reference_strings(child, inside_bundle=inside_bundle)
    elif isinstance(value, list):
        for item in value:
            yield from _reference_strings(item, inside_bundle=inside_bundle)


def relative_target(reference: str) -> Key | None:
    if reference.startswith(("#", "urn:", "http:", "https:")):
        return None
    parts = reference.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return (parts[-2], parts[-1]) if len(parts) >= 2 else None


def loading_plan(examples: dict[Key, Example]) -> tuple[list[Key], list[Key]]:
    """(placeholders to store first, examples in dependency order).

    Depth-first over the examples' references: an example is stored after what it refers to. A
    reference back to an example still being visited closes a cycle; its target gets a placeholder.
    """
    order: list[Key] = []
    placeholders: list[Key] = []
    state: dict[Key, str] = {}

    def visit(key: Key) -> None:
        state[key] = "visiting"
        for target in sorted(examples[key].references):
            if target not in examples:
                if target not in placeholders:
                    placeholders.append(target)
            elif state.get(target) == "visiting":
                if target not in placeholders:
                    placeholders.append(target)  # a cycle: store a placeholder first
            elif target not in state:
                visit(target)
        state[key] = "done"
        order.append(key)

    for key in sorted(examples):
        if key not in state:
            visit(key)
    return placeholders, order


def placeholder(key: Key) -> dict[str, Any]:
    resource_type, resource_id = key
    return {"resourceType": resource_type, "id": resource_id, **PLACEHOLDERS[resource_type]}


def without_server_meta(resource: Any) -> Any:
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    rest = {k: v for k, v in resource.items() if k != "meta"}
    return {**rest, "meta": meta} if meta else rest


# ------------------------------------------------------------------------ expected search values


def values_at(resource: dict[str, Any], path: str) -> list[Any]:
    current: list[Any] = [resource]
    for step in re.findall(r"ext\([^)]*\)|[^.]+", path):
        found: list[Any] = []
        for item in current:
            if not isinstance(item, dict):
                continue
            if step.startswith("ext("):
                url = step[4:-1]
                for extension in item.get("extension") or []:
                    if extension.get("url") == url:
                        found += [v for k, v in extension.items() if k.startswith("value")]
                continue
            if step.endswith("[x]"):
                stem = step[:-3]
                keys = [k for k in item if k.startswith(stem) and k[len(stem):][:1].isupper()]
            else:
                keys = [step]
            for key in keys:
                value = item.get(key)
                found += [v for v in value if v is not None] if isinstance(value, list) else [value] if value is not None else []
        current = found
    return current


_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


def search_value(kind: str, element: Any) -> str | None:
    """The search value that must find `element` with a parameter of `kind`, or None."""
    if kind == "token":
        return _token_value(element)
    if kind == "reference":
        if isinstance(element, dict) and isinstance(element.get("reference"), str):
            target = relative_target(element["reference"])
            return f"{target[0]}/{target[1]}" if target else None
        return None
    if kind == "date":
        if isinstance(element, str) and _DATE.match(element):
            return f"eq{element}"
        if isinstance(element, dict) and isinstance(element.get("start"), str):
            return f"ge{element['start']}"
        if isinstance(element, dict) and isinstance(element.get("end"), str):
            return f"le{element['end']}"
        return None
    if kind == "string":
        return _escape(element) if isinstance(element, str) and element.strip() else None
    if kind == "quantity":
        if not isinstance(element, dict) or not isinstance(element.get("value"), int | float):
            return None
        number = repr(element["value"])
        system, code = element.get("system"), element.get("code")
        return f"{number}|{_escape(system or '')}|{_escape(code)}" if code else number
    if kind == "uri":
        return element if isinstance(element, str) else None
    raise AssertionError(kind)


CONTACT_SYSTEMS = {"phone", "fax", "email", "pager", "url", "sms", "other"}


def _token_value(element: Any) -> str | None:
    if isinstance(element, bool):
        return "true" if element else "false"
    if isinstance(element, str):
        return _escape(element)
    if not isinstance(element, dict):
        return None
    if "coding" in element:  # CodeableConcept: its first coding with a code
        coding = next((c for c in element["coding"] if c.get("code")), None)
        return _token_value(coding) if coding else None
    code = element.get("code", element.get("value"))  # Coding, or Identifier / ContactPoint
    if not isinstance(code, str):
        return None
    system = element.get("system")
    if not isinstance(system, str) or system in CONTACT_SYSTEMS:
        return _escape(code)  # no system, or a ContactPoint: the value alone
    return f"{_escape(system)}|{_escape(code)}"


def expected_searches(example: Example) -> list[str]:
    """Query strings (after `Type?_id=id&`) that must find the example, one per main parameter."""
    queries = []
    for param in SEARCHES[example.key[0]]:
        for element in values_at(example.content, param.path):
            value = search_value(param.kind, element)
            if value is not None:
                queries.append(f"{param.name}={quote(value, safe='|/:')}")
                break
    return queries


def routing_hint(example: Example) -> str:
    """A shared type's search reaches the owner its parameters name (ARCHITECTURE.md §1); for a
    Provenance that is its first target."""
    if example.key[0] != "Provenance":
        return ""
    target = relative_target(example.content["target"][0]["reference"])
    return f"&target={target[0]}/{target[1]}" if target else ""


# ----------------------------------------------------------------------------------------- tests


def test_every_held_type_has_a_placeholder_and_search_table():
    assert set(PLACEHOLDERS) == set(ALL_TYPES)
    from fhirkit import resources

    for resource_type in ALL_TYPES:
        resources.validate(placeholder((resource_type, "x")))


def test_loading_plan_breaks_cycles_with_placeholders():
    a = Example("a.json", b"", {"resourceType": "Observation", "id": "a"}, {("Observation", "b"), ("Patient", "p")})
    b = Example("b.json", b"", {"resourceType": "Observation", "id": "b"}, {("Observation", "a")})
    c = Example("c.json", b"", {"resourceType": "Observation", "id": "c"}, {("Observation", "a")})
    placeholders, order = loading_plan({e.key: e for e in (a, b, c)})
    assert ("Patient", "p") in placeholders
    assert ("Observation", "a") in placeholders or ("Observation", "b") in placeholders
    assert order.index(("Observation", "a")) < order.index(("Observation", "c"))
    assert sorted(order) == [("Observation", "a"), ("Observation", "b"), ("Observation", "c")]


async def _put(api: Any, key: Key, body: bytes | dict[str, Any]) -> None:
    response = await api.put(f"{key[0]}/{key[1]}", body)
    assert response.status_code in (200, 201), (key, response.text)


async def test_cycle_between_resources_loads(api):
    """Two observations that refer to each other: a placeholder first, then both contents."""
    first = {"resourceType": "Observation", "id": "example-cycle-a", "status": "final", "code": CODE,
             "hasMember": [{"reference": "Observation/example-cycle-b"}]}
    second = {"resourceType": "Observation", "id": "example-cycle-b", "status": "final", "code": CODE,
              "derivedFrom": [{"reference": "Observation/example-cycle-a"}]}
    cycle = {(o["resourceType"], o["id"]): Example(o["id"], json.dumps(o).encode(), o, set(held_references(o)))
             for o in (first, second)}
    placeholders, order = loading_plan(cycle)
    assert len(placeholders) == 1
    for key in placeholders:
        await _put(api, key, placeholder(key))
    for key in order:
        await _put(api, key, cycle[key].raw)
    for key, example in cycle.items():
        read = (await api.get(f"{key[0]}/{key[1]}")).json()
        assert without_server_meta(read) == example.content


async def test_every_example_stores_reads_back_and_is_found(api):
    examples = load_examples()
    placeholders, order = loading_plan(examples)
    for key in PLACEHOLDER_BASES:
        await _put(api, key, placeholder(key))
    for key in placeholders:
        await _put(api, key, placeholder(key))

    problems: list[str] = []
    for key in order:
        example = examples[key]
        response = await api.put(f"{key[0]}/{key[1]}", example.raw)
        if response.status_code not in (200, 201):
            problems.append(f"{example.file}: PUT {response.status_code} {response.text[:300]}")
            continue
        read = await api.get(f"{key[0]}/{key[1]}")
        sent, back = parse_exact(example.raw), parse_exact(read.content)
        if without_server_meta(back) != without_server_meta(sent):
            problems.append(f"{example.file}: read back differs from what was sent")
        if back["meta"]["versionId"] != read.headers["etag"].split('"')[1]:
            problems.append(f"{example.file}: ETag does not match meta.versionId")
    assert not problems, "\n".join(problems)

    semaphore = asyncio.Semaphore(8)

    async def check(example: Example, query: str) -> str | None:
        resource_type, resource_id = example.key
        url = f"{resource_type}?_id={quote(resource_id)}&{query}{routing_hint(example)}"
        async with semaphore:
            response = await api.get(url)
        if response.status_code != 200:
            return f"{example.file}: {url} → {response.status_code} {response.text[:200]}"
        found = [e["resource"]["id"] for e in response.json().get("entry", []) if e["search"]["mode"] == "match"]
        return None if found == [resource_id] else f"{example.file}: {url} found {found}"

    checks = []
    for example in examples.values():
        checks.append(check(example, "_format=json"))  # `_id` alone
        checks += [check(example, query) for query in expected_searches(example)]
    results = await asyncio.gather(*checks)
    failures = [r for r in results if r is not None]
    assert not failures, f"{len(failures)} of {len(checks)} searches failed:\n" + "\n".join(failures)
    assert len(checks) > 4 * len(examples)  # the table really exercised the main parameters

    # The searches above would also pass if a filter were ignored: a wrong value finds nothing.
    for query in ("identifier=urn:oid:1.2.36.146.595.217.0.1|nope", "family=Nobody", "birthdate=1999-01-01",
                  "gender=female", "organization=Organization/nope"):
        response = await api.get(f"Patient?_id=example&{query}")
        assert response.status_code == 200 and response.json()["total"] == 0, (query, response.text[:300])
