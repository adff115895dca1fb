"""The master patient index: one Patient per person, found by national ID (居民身份证).

A national ID is validated by its GB 11643 check character (a wrong one is a 400). A second live
Patient with the same national ID is refused with 409 naming the existing one; a conditional
create (`If-None-Exist: identifier=urn:oid:2.16.156.10011.1.3|…`) returns the existing one
instead, which the engine resolves before these hooks run. A Patient merged into another
(`link.type = replaced-by`) keeps its identifiers but no longer holds the national ID.
"""

from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from directory import identifiers
from directory.db import national_id_index
from fhirkit.errors import DuplicateResource, InvalidRequest
from fhirkit.store.hooks import WriteContext
from fhirkit.store.repository import Repository


def national_ids(patient: dict[str, Any]) -> list[tuple[int, str]]:
    return [
        (index, identifier.get("value", ""))
        for index, identifier in enumerate(patient.get("identifier") or [])
        if isinstance(identifier, dict) and identifier.get("system") == identifiers.NATIONAL_ID_SYSTEM
    ]


def is_replaced(patient: dict[str, Any]) -> bool:
    return any((link or {}).get("type") == "replaced-by" for link in patient.get("link") or [])


def live_national_id(patient: dict[str, Any]) -> str | None:
    if is_replaced(patient):
        return None
    found = national_ids(patient)
    return found[0][1] if found else None


class PatientHooks:
    async def before_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is None:
            return
        found = national_ids(resource)
        for index, value in found:
            if not identifiers.is_valid_national_id(value):
                raise InvalidRequest(
                    f"Patient.identifier[{index}]: '{value[:24]}' is not a valid national ID "
                    "(18 characters, GB 11643 check character, a real birth date)",
                    expression=[f"Patient.identifier[{index}].value"],
                )
        if len({value for _, value in found}) > 1:
            raise InvalidRequest("A Patient carries at most one national ID", expression=["Patient.identifier"])
        national_id = live_national_id(resource)
        if national_id is not None:
            holder = await holder_of(repo, national_id)
            if holder is not None and holder != context.resource_id:
                raise _duplicate(national_id, holder)

    async def after_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        await repo.conn.execute(delete(national_id_index).where(national_id_index.c.patient_id == context.resource_id))
        national_id = live_national_id(resource) if resource is not None else None
        if national_id is None:
            return
        try:
            async with repo.conn.begin_nested():
                await repo.conn.execute(
                    insert(national_id_index).values(national_id=national_id, patient_id=context.resource_id)
                )
        except IntegrityError:
            # Another registration of the same person committed first (PostgreSQL; SQLite serialises writers).
            raise _duplicate(national_id, await holder_of(repo, national_id) or "?") from None


def _duplicate(national_id: str, holder: str) -> DuplicateResource:
    masked = f"{national_id[:6]}********{national_id[-4:]}"
    return DuplicateResource(
        f"Patient/{holder} already has national ID {masked}; update that record, "
        "or create with If-None-Exist to get it back",
        expression=["Patient.identifier"],
        details={"coding": [{"system": "http://county-alliance.org/fhir/CodeSystem/mpi", "code": "existing",
                             "display": f"Patient/{holder}"}]},
    )


async def holder_of(repo: Repository, national_id: str) -> str | None:
    stmt = select(national_id_index.c.patient_id).where(national_id_index.c.national_id == national_id)
    return (await repo.conn.execute(stmt)).scalar_one_or_none()
