"""Who may see and change what: ownership plus grants, compiled into one SQL predicate.

Every stored resource carries the organization that created it (`fhir_resource.owner`, set by the
server, never by the client). Beyond ownership an organization sees the resources that name it as
a party (a referral addressed to it), every hop of a chain it is a party to (all Tasks sharing one
referral `requisition`), and the patient data covered by a grant: a row in `fhir_access_grant`
(grantee, patient, scope, expiry) written when a referral is accepted, a teleconsultation opens,
or a doctor checks a patient's prior results. `AccessPolicy.visible` turns that into one SQL
condition on a `fhir_resource` alias; the repository adds it to every read path (read, vread,
history, search, includes, chains, `_has`, totals, conditional writes). It fails closed: a caller
without an organization gets 403, never unfiltered rows (ARCHITECTURE.md §5).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, exists, false, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import FromClause

from fhirkit.errors import Forbidden
from fhirkit.search.values import now_micros
from fhirkit.store import driver
from fhirkit.store.tables import access_grant, access_opt_out, reference_index, token_index

Clause = ColumnElement[bool]
SYSTEM_ROLE = "system"
DAY_MICROS = 86_400 * 1_000_000
# The name of the `fhir_resource` alias a search selects from (one shared alias object).
SEARCH_ALIAS = "r"
# Grants are judged on a clock that moves in these steps, rounded up (see AccessPolicy.visible).
GRANT_CLOCK_STEP_MICROS = 10_000_000


@dataclass(frozen=True)
class AccessPolicy:
    """What one service shows to whom. Everything not listed is visible to its owner only."""

    # Types every authenticated member reads (the directory, code systems, catalogs).
    public_types: frozenset[str] = frozenset()
    # Type → reference search parameters that name the organizations party to a resource.
    parties: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Type → token search parameter shared by all records of one chain (a referral's hops): a
    # party to one record of the chain sees them all.
    chains: Mapping[str, str] = field(default_factory=dict)
    # Type → reference parameters to records whose parties also see this one (a Task's focus, a
    # Provenance's target): one level, following the referenced record's owner, parties and chain.
    follows: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Grant scopes honoured by this service; a grant makes the grantee see every resource here
    # that refers to the granted patient.
    grant_scopes: frozenset[str] = frozenset()
    # The types a grant opens (None: every type that refers to the patient).
    granted_types: frozenset[str] | None = None
    # A service's own extra rule (e.g. the county referral desk sees unaddressed referrals).
    extra: Callable[[Any, FromClause], Clause | None] | None = None

    # Built conditions for the base table by caller and clock step: building one cost more than
    # running the query it filters (a search by patient and code).
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def visible(
        self, caller: Any, target: FromClause, *, now: int | None = None, resource_type: str | None = None
    ) -> Clause | None:
        """The condition on `target` (a `fhir_resource` alias) keeping what `caller` may read;
        None when nothing is hidden from it (the services' own system identity, break-the-glass).
        Grants are judged at `now` rounded up to the next step of GRANT_CLOCK_STEP_MICROS (10 s):
        one expiring within that step is already treated as expired (never the other way), and
        a caller's condition is built and compiled once per step, not per request.

        `resource_type`: the rows' type, when the query fixes it (a search, a read by id). The
        parts that test for other types are left out (they are false for every such row), and a
        public type needs no condition at all. PostgreSQL planned the whole condition for every
        search: 1.6 ms, against 0.2 ms to run the search itself."""
        if SYSTEM_ROLE in getattr(caller, "roles", ()) or getattr(caller, "break_glass", None):
            return None
        if resource_type is not None and resource_type in self.public_types:
            return None
        organization = _organization_of(caller)
        step = GRANT_CLOCK_STEP_MICROS
        moment = -(-(now if now is not None else now_micros()) // step) * step
        if target is not _base_table() and getattr(target, "name", None) != SEARCH_ALIAS:
            return self._visible(caller, organization, target, moment, resource_type)
        key = (organization, getattr(caller, "level", None), tuple(getattr(caller, "roles", ())), target, resource_type)
        memo = self._memo
        if memo.get("moment") != moment:  # conditions of an earlier step are never used again
            memo.clear()
            memo["moment"] = moment
        clause = memo.get(key)
        if clause is None:
            clause = memo[key] = self._visible(caller, organization, target, moment, resource_type)
        return clause

    def _visible(self, caller: Any, organization: str, target: FromClause, now: int, only: str | None) -> Clause:
        """`only`: the rows' type if known; each part below is guarded by a test of the row's type."""
        clauses = [target.c.owner == organization, *self._party_clauses(organization, target, only=only)]
        if self.follows and _may_be(only, self.follows):
            clauses.append(self._follows_clause(organization, target, now))
        if self.public_types and only is None:  # a known public type has no condition (`visible`)
            clauses.append(target.c.resource_type.in_(sorted(self.public_types)))
        if self.grant_scopes and (self.granted_types is None or _may_be(only, self.granted_types)):
            clauses.append(self._granted(organization, target, now))
        return or_(*clauses, *self._extra_clauses(caller, target))

    def modifiable(self, caller: Any, target: FromClause) -> Clause | None:
        """What `caller` may change: its own resources and those naming it as a party (the
        service's hooks then decide what a party may do). Grants and public reads never let a
        caller write; break-the-glass is for reading only."""
        if SYSTEM_ROLE in getattr(caller, "roles", ()):
            return None
        organization = _organization_of(caller)
        clauses = [target.c.owner == organization, *self._party_clauses(organization, target, chains=False)]
        return or_(*clauses, *self._extra_clauses(caller, target))

    def _extra_clauses(self, caller: Any, target: FromClause) -> list[Clause]:
        extra = self.extra(caller, target) if self.extra is not None else None
        return [extra] if extra is not None else []

    def _party_clauses(
        self, organization: str, target: FromClause, *, chains: bool = True, only: str | None = None
    ) -> list[Clause]:
        """Each behind a test of the row's type: PostgreSQL may turn a party EXISTS into a hashed
        set of every index row naming the organization (all of a lab's results name it as
        performer), built on first use; a row of another type then never builds it. `only`: the
        rows' type if known, which leaves out the parts for other types."""
        if not self.parties:
            return []
        org_id = organization.split("/", 1)[1]
        clauses = []
        if _may_be(only, self.parties):
            clauses.append(and_(target.c.resource_type.in_(sorted(self.parties)), _names_party(target, self.parties, org_id)))
        if chains and self.chains and _may_be(only, self.chains):
            clauses.append(and_(target.c.resource_type.in_(sorted(self.chains)), self._chain_clause(target, org_id)))
        return clauses

    def _follows_clause(self, organization: str, target: FromClause, now: int) -> Clause:
        """A resource of a following type is visible with what it is about: owned by the caller,
        naming it as a party, or opened to it by a grant (a signature's Provenance with the
        report a referral opened). The type test first keeps the EXISTS off every other row."""
        ref, followed = reference_index.alias(), _resource_alias()
        seen = [followed.c.owner == organization, *self._party_clauses(organization, followed)]
        if self.grant_scopes:
            seen.append(self._granted(organization, followed, now))
        return and_(target.c.resource_type.in_(sorted(self.follows)), exists(
            select(ref.c.rid)
            .join(followed, and_(followed.c.resource_type == ref.c.target_type, followed.c.resource_id == ref.c.target_id))
            .where(
                ref.c.rid == target.c.rid,
                _param_of(ref, self.follows),
                followed.c.deleted == false(),
                or_(*seen),
            )
        ))

    def _chain_clause(self, target: FromClause, org_id: str) -> Clause:
        """Some record of the same chain (same token value) names the organization, or was
        created by it."""
        mine, theirs, other = token_index.alias(), token_index.alias(), _resource_alias()
        party_of_other = or_(other.c.owner == f"Organization/{org_id}", _names_party(other, self.parties, org_id))
        linked = (
            select(mine.c.rid)
            .join(theirs, and_(theirs.c.code == mine.c.code, theirs.c.system == mine.c.system))
            .join(other, other.c.rid == theirs.c.rid)
            .where(
                mine.c.rid == target.c.rid,
                _param_of(mine, self.chains),
                _param_of(theirs, self.chains),
                other.c.deleted == false(),
                party_of_other,
            )
        )
        return exists(linked)

    def _granted(self, organization: str, target: FromClause, now: int) -> Clause:
        ref, grant = reference_index.alias(), access_grant.alias()
        patient_of_row = select(ref.c.rid).join(
            grant, and_(grant.c.patient_id == ref.c.target_id, ref.c.target_type == "Patient")
        )
        types = [] if self.granted_types is None else [target.c.resource_type.in_(sorted(self.granted_types))]
        return and_(*types, exists(
            patient_of_row.where(
                ref.c.rid == target.c.rid,
                grant.c.grantee == organization,
                grant.c.scope.in_(sorted(self.grant_scopes)),
                or_(grant.c.expires_at.is_(None), grant.c.expires_at > now),
                or_(grant.c.target_id.is_(None),
                    and_(grant.c.target_type == target.c.resource_type, grant.c.target_id == target.c.resource_id)),
                # A patient who opted out of sharing is opened by no grant (ownership still holds).
                ~exists(select(access_opt_out.c.consent_id).where(access_opt_out.c.patient_id == grant.c.patient_id)),
            )
        ))


def _may_be(only: str | None, types: Iterable[str]) -> bool:
    """Whether rows of type `only` (None: of any type) can be among `types`."""
    return only is None or only in types


def _organization_of(caller: Any) -> str:
    organization = getattr(caller, "organization", None)
    if not isinstance(organization, str) or not organization.startswith("Organization/") or "/" in organization[13:]:
        # Fail closed: without a known organization no predicate can be built, so nothing is shown.
        raise Forbidden("The caller's organization is unknown, so no access rule applies to it")
    return organization


def _patient_id(patient: str) -> str:
    """`Patient/x` or `x` → `x`: grants and opt-outs are kept by the patient's id."""
    return patient.split("/", 1)[1] if patient.startswith("Patient/") else patient


def _names_party(target: FromClause, parties: Mapping[str, tuple[str, ...]], org_id: str) -> Clause:
    ref = reference_index.alias()
    return exists(
        select(ref.c.rid).where(
            ref.c.rid == target.c.rid,
            _param_of(ref, parties),
            ref.c.target_type == "Organization",
            ref.c.target_id == org_id,
        )
    )


def _param_of(index: FromClause, params: Mapping[str, Any]) -> Clause:
    """(resource_type, param) among the policy's pairs."""
    pairs = [
        and_(index.c.resource_type == resource_type, index.c.param.in_(names if isinstance(names, tuple) else (names,)))
        for resource_type, names in sorted(params.items())
    ]
    return or_(*pairs) if pairs else false()


def _base_table() -> FromClause:
    from fhirkit.store.tables import resource

    return resource


def _resource_alias() -> FromClause:
    from fhirkit.store.tables import resource

    return resource.alias()


# A grant the source holds: (gid, target type, target id, expires at); the targets None when it
# opens every resource of the patient.
HeldGrant = tuple[int, str | None, str | None, int | None]


def held_grants(patient: Any) -> Any:
    """The grants a source holds of one patient, as `grant_access` looks them up first: `patient` is
    a bound parameter or an SQL expression; `b_grantee`, `b_scope` and `b_source` are bound. For a
    caller that reads them in a statement of its own (`grant_access(held=…)`)."""
    return select(
        access_grant.c.gid, access_grant.c.target_type, access_grant.c.target_id, access_grant.c.expires_at,
    ).where(
        access_grant.c.grantee == bindparam("b_grantee"), access_grant.c.patient_id == patient,
        access_grant.c.scope == bindparam("b_scope"), access_grant.c.source == bindparam("b_source"),
    )


_GRANTS_OF_SOURCE = held_grants(bindparam("b_patient_id"))


async def grant_access(
    conn: AsyncConnection,
    *,
    grantee: str,
    patient: str,
    scope: str,
    source: str,
    reason: str,
    expires_at: int | None,
    now: int | None = None,
    targets: Sequence[tuple[str, str] | None] = (None,),
    renew_within: int = 0,
    writing: Callable[[], AbstractAsyncContextManager[Any]] = nullcontext,
    held: Iterable[HeldGrant] | None = None,
) -> None:
    """Record that `grantee` may read `patient`'s data of `scope` until `expires_at` (None: until
    revoked). Called inside the transaction of the write (or event) that creates the relationship;
    a source granting again replaces its earlier grant's expiry (the relationship's latest state).
    Each of `targets`, a (type, id), narrows a grant to one resource of the patient; None grants
    all of them. Several at once (a recognition check's results) cost one look-up of the source's
    grants, one insert of the new ones and one update of those whose expiry changed.
    `renew_within` (microseconds): a held grant already lasting until less than that before the
    new expiry is left as it is, so that a source granting again and again (the same check
    repeated) does not rewrite its rows each time; a shorter expiry always applies.
    `writing()` wraps the writes when they take two statements, inserts and an update
    (`OperationCall.writing`: a check looks its grants up outside a transaction and opens one only
    then; a repeated check that finds every grant held opens none).
    `held`: the source's grants of the patient as `held_grants` selects them, when the caller read
    them in a statement of its own (a recognition check, with its results); else looked up here."""
    patient_id = _patient_id(patient)
    reason = reason[:255]
    if held is None:
        held = await driver.execute(conn, _GRANTS_OF_SOURCE, {
            "b_grantee": grantee, "b_patient_id": patient_id, "b_scope": scope, "b_source": source})
    by_target: dict[tuple[str | None, str | None], tuple[int, int | None]] = {}
    for gid, target_type, target_id, held_until in sorted(held, key=lambda grant: grant[0]):
        by_target.setdefault((target_type, target_id), (gid, held_until))  # the oldest, if twice
    created = now if now is not None else now_micros()
    new: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    extended: list[int] = []
    for target_type, target_id in (target or (None, None) for target in targets):
        key = (target_type, target_id)
        if key in by_target:
            gid, held_until = by_target.pop(key)  # popped: a target named twice is extended once
            if _moves(held_until, expires_at, renew_within):
                extended.append(gid)
        elif key not in new:
            new[key] = {"grantee": grantee, "patient_id": patient_id, "scope": scope, "source": source,
                        "reason": reason, "expires_at": expires_at, "created_at": created,
                        "target_type": target_type, "target_id": target_id}
    if not new and not extended:
        return
    # Inserting or extending alone is one statement (`insert_rows` writes many rows in one on
    # PostgreSQL), atomic by itself: on an autocommit connection BEGIN and COMMIT would be two
    # more round trips, which a check's first grants paid.
    async with writing() if new and extended else nullcontext():
        await driver.insert_rows(conn, access_grant, list(new.values()))
        if extended:
            await conn.execute(access_grant.update().where(access_grant.c.gid.in_(extended))
                               .values(expires_at=expires_at, reason=reason))


def _moves(held_until: int | None, expires_at: int | None, renew_within: int) -> bool:
    """Whether a held grant's expiry changes to `expires_at` (None: never expires)."""
    if held_until is None or expires_at is None:
        return held_until != expires_at
    return expires_at < held_until or expires_at - held_until >= max(1, renew_within)


async def revoke_access(conn: AsyncConnection, *, source: str, now: int | None = None) -> None:
    """End every grant a source made (a referral cancelled, a consultation closed), from now."""
    ended = now if now is not None else now_micros()
    await conn.execute(
        access_grant.update()
        .where(access_grant.c.source == source, or_(access_grant.c.expires_at.is_(None), access_grant.c.expires_at > ended))
        .values(expires_at=ended)
    )


async def record_opt_out(conn: AsyncConnection, *, consent_id: str, patient: str | None, now: int) -> None:
    """Keep this service's copy of one Consent's opt-out: `patient` while the Consent is an
    active deny, None when it is not (any more)."""
    await conn.execute(access_opt_out.delete().where(access_opt_out.c.consent_id == consent_id))
    if patient is not None:
        await conn.execute(insert(access_opt_out).values(consent_id=consent_id, patient_id=_patient_id(patient),
                                                         recorded_at=now))

