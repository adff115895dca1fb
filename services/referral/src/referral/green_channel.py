"""Green channel (绿色通道) referrals: chest pain, stroke, trauma, critical maternal, critical neonatal.

A green-channel ServiceRequest carries the extension `…/StructureDefinition/green-channel` with
the `pathway`, the `eta` and the `keyFindings`, and priority `stat`. It goes to the emergency
center of its pathway under the county hospital: a request without a performer is routed there by
the server; a request naming another receiver is refused. The referral Task records the moments
that door-to-decision times are computed from (sent, received, accepted, arrived).
"""

from typing import Any

from fhirkit.errors import BusinessRuleViolation

BASE = "http://county-alliance.org/fhir"
GREEN_CHANNEL = f"{BASE}/StructureDefinition/green-channel"
TIMELINE = f"{BASE}/StructureDefinition/green-channel-timeline"
PATHWAY_SYSTEM = f"{BASE}/CodeSystem/green-channel-pathway"
FACILITY_LEVEL_SYSTEM = f"{BASE}/CodeSystem/facility-level"
CENTER_FOR_PATHWAY = {
    "chest-pain": "chest-pain-center",
    "stroke": "stroke-center",
    "trauma": "trauma-center",
    "critical-maternal": "critical-maternal-center",
    "critical-neonatal": "critical-neonatal-center",
}
# Which transition stamps which moment of the timeline.
MOMENT_OF_STATUS = {"requested": "sent", "received": "received", "accepted": "accepted", "in-progress": "arrived"}


def green_channel(request: dict[str, Any]) -> dict[str, Any] | None:
    for extension in request.get("extension") or []:
        if extension.get("url") == GREEN_CHANNEL:
            return extension
    return None


def pathway(request: dict[str, Any]) -> str | None:
    extension = green_channel(request)
    if extension is None:
        return None
    for part in extension.get("extension") or []:
        if part.get("url") == "pathway":
            coding = part.get("valueCoding") or {}
            concept = part.get("valueCodeableConcept") or {}
            coding = coding or next(iter(concept.get("coding") or []), {})
            return coding.get("code")
    return ""


def check_request(request: dict[str, Any]) -> str | None:
    """The pathway of a green-channel request after checking it; None for an ordinary referral."""
    code = pathway(request)
    if code is None:
        return None
    if code not in CENTER_FOR_PATHWAY:
        raise BusinessRuleViolation(
            f"green-channel pathway '{code}' is not one of {', '.join(CENTER_FOR_PATHWAY)}",
            expression=["ServiceRequest.extension('green-channel').extension('pathway')"],
        )
    if request.get("priority") != "stat":
        raise BusinessRuleViolation("A green-channel referral has priority 'stat'", expression=["ServiceRequest.priority"])
    return code


async def route_to_center(directory: Any, request: dict[str, Any], code: str, county: str | None) -> None:
    """Fill an empty performer with the pathway's emergency center; refuse any other receiver."""
    if county is None:
        raise BusinessRuleViolation("A green-channel referral needs a county hospital above the sender")
    center_code = CENTER_FOR_PATHWAY[code]
    centers = await directory.search("Organization", [
        ("partof", county), ("type", f"{FACILITY_LEVEL_SYSTEM}|{center_code}"), ("_count", "5")])
    if not centers:
        raise BusinessRuleViolation(f"The alliance of {county} has no {center_code} for the {code} green channel")
    center = f"Organization/{centers[0]['id']}"
    performers = [p.get("reference") for p in request.get("performer") or []]
    if not performers:
        request["performer"] = [{"reference": center}]
    elif performers != [center]:
        raise BusinessRuleViolation(
            f"A {code} green-channel referral goes to the {center_code} ({center}), not {', '.join(map(str, performers))}",
            expression=["ServiceRequest.performer"],
        )


def stamp(task: dict[str, Any], status: str, now: str) -> None:
    """Record when a green-channel Task reached `status` (first time only)."""
    moment = MOMENT_OF_STATUS.get(status)
    if moment is None:
        return
    extensions = task.setdefault("extension", [])
    timeline = next((e for e in extensions if e.get("url") == TIMELINE), None)
    if timeline is None:
        timeline = {"url": TIMELINE, "extension": []}
        extensions.append(timeline)
    if not any(part.get("url") == moment for part in timeline["extension"]):
        timeline["extension"].append({"url": moment, "valueDateTime": now})


def timeline(task: dict[str, Any]) -> dict[str, str]:
    for extension in task.get("extension") or []:
        if extension.get("url") == TIMELINE:
            return {part["url"]: part["valueDateTime"] for part in extension.get("extension") or []}
    return {}
