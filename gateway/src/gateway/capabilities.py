"""One CapabilityStatement for the whole alliance, merged from what each service declares."""

from typing import Any

from fhirkit.api.capabilities import rev_includes, search_documentation
from fhirkit.resources import FHIR_VERSION

SMART_SECURITY = {
    "service": [
        {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}
            ]
        }
    ],
    "description": "OAuth2 client credentials per SMART Backend Services (private_key_jwt RS384/ES384, "
    "or client_secret_basic/post); SMART v1 and v2 system scopes; see /fhir/.well-known/smart-configuration",
}


GATEWAY_DOCUMENTATION = (
    " Includes whose resources another service holds (_include, _revinclude, :iterate) are read there "
    "by the gateway as the caller, so they are what the caller could find by searching them. A search of "
    "ServiceRequest, Task or Provenance that names no owner is merged across the services holding them, "
    "with next and previous links."
)


def merge_capabilities(statements: list[dict[str, Any]], base_url: str) -> dict[str, Any]:
    resources: dict[str, dict[str, Any]] = {}
    system_operations: dict[str, dict[str, Any]] = {}
    for statement in statements:
        for rest in statement.get("rest", []):
            for resource in rest.get("resource", []):
                merged = resources.setdefault(resource["type"], dict(resource))
                operations = {op["name"]: op for op in merged.get("operation", [])}
                operations.update({op["name"]: op for op in resource.get("operation", [])})
                if operations:
                    merged["operation"] = sorted(operations.values(), key=lambda op: op["name"])
            for op in rest.get("operation", []):
                system_operations[op["name"]] = op
    for name, resource in resources.items():
        # The gateway follows includes across services (gateway/foreign_includes.py): any type the
        # alliance holds may be revincluded.
        resource["searchRevInclude"] = rev_includes(name, resources)
    origin = base_url.rsplit("/fhir", 1)[0]
    security = dict(SMART_SECURITY)
    security["extension"] = [
        {
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": "token", "valueUri": f"{origin}/auth/token"}],
        }
    ]
    rest: dict[str, Any] = {
        "mode": "server",
        "security": security,
        "resource": [resources[name] for name in sorted(resources)],
        "documentation": search_documentation() + GATEWAY_DOCUMENTATION,
        "interaction": [{"code": "transaction"}, {"code": "batch"}],
    }
    if system_operations:
        rest["operation"] = sorted(system_operations.values(), key=lambda op: op["name"])
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "publisher": "County medical alliance interoperability service",
        "kind": "instance",
        "software": {"name": "county-alliance", "version": "0.1.0"},
        "implementation": {"description": "County medical alliance (县域医共体) FHIR server", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json", "application/merge-patch+json"],
        "rest": [rest],
    }
