"""The CapabilityStatement, generated from the same declaration that builds the routes."""

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

from fhirkit.resources import FHIR_VERSION
from fhirkit.search import definitions
from fhirkit.search.request import SUPPORTED_MODIFIERS
from fhirkit.search.values import local_time_zone

if TYPE_CHECKING:
    from fhirkit.api.router import FhirService

INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]
SEARCHABLE = {"token", "string", "reference", "date", "number", "quantity", "uri"}
SEARCH_DOCUMENTATION = (
    "Search: _include and _revinclude, each with :iterate (at most 8 rounds, 1000 included resources per "
    "page); _elements takes element names and paths into them (code.coding, identifier.value; mandatory "
    "elements always kept, result tagged SUBSETTED); _summary=true|text|data|count; keyset paging with "
    "next and previous links. A date, or a dateTime without a time zone, stored or searched, is read in "
    "the server's local time zone ({zone})."
)


def capability_statement(service: "FhirService", base: str) -> bytes:
    return orjson.dumps(capability_dict(service, base))


def capability_dict(service: "FhirService", base: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "kind": "instance",
        "software": {"name": f"county-alliance {service.name}", "version": "0.1.0"},
        "implementation": {"description": service.title, "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json", "application/merge-patch+json"],
        "rest": [
            {
                "mode": "server",
                "resource": [_resource(service, t) for t in sorted(service.store.resource_types)],
                "interaction": [
                    {"code": "transaction"}, {"code": "batch"}, {"code": "history-system"},
                ],
                "operation": [_operation(op) for op in service.operations if op.system],
                "documentation": search_documentation(),
            }
        ],
    }


def _resource(service: "FhirService", resource_type: str) -> dict[str, Any]:
    params = definitions.parameters_for(resource_type)
    entry: dict[str, Any] = {
        "type": resource_type,
        "interaction": [{"code": code} for code in INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "not-supported",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "local", "enforced"],
        "searchInclude": sorted(f"{resource_type}:{n}" for n, p in params.items() if p.type == "reference"),
        # What this service can revinclude itself; the gateway's statement adds every alliance type.
        "searchRevInclude": rev_includes(resource_type, service.store.resource_types),
        "searchParam": [
            {
                "name": name,
                "definition": param.url,
                "type": param.type,
                "documentation": _modifiers(param.type),
            }
            for name, param in sorted(params.items())
            if param.type in SEARCHABLE
        ],
    }
    operations = [_operation(op) for op in service.operations if resource_type in op.resource_types]
    if operations:
        entry["operation"] = operations
    return entry


def search_documentation() -> str:
    return SEARCH_DOCUMENTATION.format(zone=local_time_zone())


def rev_includes(target_type: str, source_types: Iterable[str]) -> list[str]:
    """`Source:param` for each reference parameter of `source_types` that can point at `target_type`."""
    return sorted(
        f"{source}:{name}"
        for source in source_types
        for name, param in definitions.parameters_for(source).items()
        if param.type == "reference" and target_type in param.targets
    )


def _modifiers(kind: str) -> str:
    supported = sorted(SUPPORTED_MODIFIERS.get(kind, ()))
    return "Modifiers: " + (", ".join(f":{m}" for m in supported) if supported else "none")


def _operation(op: Any) -> dict[str, Any]:
    return {
        "name": op.name,
        "definition": op.definition or f"http://county-alliance.org/fhir/OperationDefinition/{op.name}",
    }
