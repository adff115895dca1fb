"""SMART on FHIR scopes, v1 (`.read`/`.write`/`.*`) and v2 (`.cruds` with optional `?query`).

Every scope is held in its v2 form internally; v1 spellings are kept only for rendering, so that a
client asking in v1 gets its answer back in v1 where the result can be said that way.
"""

import re
from dataclasses import dataclass
from typing import Literal

Interaction = Literal["c", "r", "u", "d", "s"]

CONTEXTS = ("patient", "user", "system")
INTERACTION_ORDER = "cruds"
# Registered to the clients whose users may read outside the normal access rules in an emergency,
# with a stated reason (docs/security.md); a role, not a resource permission.
BREAK_GLASS_SCOPE = "alliance/break-glass"
# Registered to the auditors' clients: only they read the audit trail (AuditEvent).
AUDIT_SCOPE = "alliance/audit"
# Scopes with no bearing on resource permissions; accepted so that a client asking for them is not refused.
NON_RESOURCE_SCOPES = frozenset({"openid", "fhirUser", "offline_access", BREAK_GLASS_SCOPE, AUDIT_SCOPE})
# The identity roles such scopes give.
ROLE_SCOPES = {BREAK_GLASS_SCOPE: "break-glass", AUDIT_SCOPE: "auditor"}

_V1_TO_V2 = {"read": "rs", "write": "cud", "*": "cruds"}
_V2_TO_V1 = {v: k for k, v in _V1_TO_V2.items()}

_SCOPE_RE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]{0,63})\.(?P<perm>[a-z*]+)(?:\?(?P<query>.+))?$"
)
_V2_PERMISSION_RE = re.compile(r"^c?r?u?d?s?$")
# A search restriction is a plain `name=value(&name=value)*`; anything fancier is refused rather than guessed.
_QUERY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-.:]*=[^&=\s]+(?:&[A-Za-z_][A-Za-z0-9_\-.:]*=[^&=\s]+)*$")


class InvalidScope(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Scope:
    context: str
    resource_type: str  # a FHIR type name or "*"
    interactions: str  # a subsequence of "cruds", never empty
    query: str | None = None
    v1: bool = False  # spelled in v1 by whoever asked; affects rendering only

    @classmethod
    def parse(cls, text: str) -> "Scope":
        match = _SCOPE_RE.match(text)
        if match is None:
            raise InvalidScope(f"not a SMART scope: {text!r}")
        perm, query = match["perm"], match["query"]
        if perm in _V1_TO_V2:
            if query is not None:
                raise InvalidScope(f"v1 scopes take no query: {text!r}")
            return cls(match["context"], match["type"], _V1_TO_V2[perm], None, v1=True)
        if not perm or not _V2_PERMISSION_RE.match(perm):
            raise InvalidScope(f"permissions must be a subsequence of 'cruds': {text!r}")
        if query is not None and not _QUERY_RE.match(query):
            raise InvalidScope(f"unsupported scope query: {text!r}")
        return cls(match["context"], match["type"], perm, query)

    def __str__(self) -> str:
        if self.v1 and self.query is None and self.interactions in _V2_TO_V1:
            return f"{self.context}/{self.resource_type}.{_V2_TO_V1[self.interactions]}"
        suffix = f"?{self.query}" if self.query else ""
        return f"{self.context}/{self.resource_type}.{self.interactions}{suffix}"

    def covers(self, resource_type: str, interaction: str) -> bool:
        return interaction in self.interactions and self.resource_type in ("*", resource_type)

    def intersect(self, granted: "Scope") -> "Scope | None":
        """The part of this (requested) scope that `granted` allows; None when nothing is left."""
        if self.context != granted.context:
            return None
        if self.resource_type == "*":
            resource_type = granted.resource_type
        elif granted.resource_type in ("*", self.resource_type):
            resource_type = self.resource_type
        else:
            return None
        interactions = "".join(
            i for i in INTERACTION_ORDER if i in self.interactions and i in granted.interactions
        )
        if not interactions:
            return None
        return Scope(
            self.context, resource_type, interactions, _and_queries(self.query, granted.query), self.v1
        )


def _and_queries(a: str | None, b: str | None) -> str | None:
    # Repeating search parameters with `&` is a FHIR AND, which is what both restrictions together mean.
    if a is None or a == b:
        return b
    if b is None:
        return a
    parts = list(dict.fromkeys(a.split("&") + b.split("&")))
    return "&".join(parts)


@dataclass(frozen=True, slots=True)
class ScopeSet:
    scopes: tuple[Scope, ...] = ()
    extras: tuple[str, ...] = ()  # openid, fhirUser, offline_access

    @classmethod
    def parse(cls, text: str | None, *, strict: bool = False) -> "ScopeSet":
        """Strict parsing (for registration) refuses garbage; lenient parsing (for requests) drops it."""
        scopes: list[Scope] = []
        extras: list[str] = []
        for word in dict.fromkeys((text or "").split()):
            if word in NON_RESOURCE_SCOPES:
                extras.append(word)
                continue
            try:
                scopes.append(Scope.parse(word))
            except InvalidScope:
                if strict:
                    raise
        return cls(tuple(scopes), tuple(extras))

    def __str__(self) -> str:
        return " ".join(self.strings())

    def __bool__(self) -> bool:
        return bool(self.scopes)

    def strings(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([str(s) for s in self.scopes] + list(self.extras)))

    def permits(
        self, resource_type: str, interaction: str, *, contexts: tuple[str, ...] = ("system", "user")
    ) -> bool:
        """True only when an unrestricted scope covers the interaction.

        Scopes with a `?query` need search narrowing, and `patient/` scopes need a patient compartment;
        neither is applied here, so neither grants anything by default (fail closed). A caller that
        does apply them uses `restrictions()` or passes `contexts` explicitly.
        """
        return any(
            s.query is None and s.context in contexts and s.covers(resource_type, interaction)
            for s in self.scopes
        )

    def restrictions(
        self, resource_type: str, interaction: str, *, contexts: tuple[str, ...] = ("system", "user")
    ) -> tuple[str, ...] | None:
        """None: not allowed. (): allowed without restriction. Otherwise alternative queries (OR) to narrow by."""
        queries: list[str] = []
        for scope in self.scopes:
            if scope.context in contexts and scope.covers(resource_type, interaction):
                if scope.query is None:
                    return ()
                queries.append(scope.query)
        return tuple(dict.fromkeys(queries)) or None

    def narrow(self, requested: str | None) -> "ScopeSet":
        """What `requested` asks for that this (registered) set allows. Raises InvalidScope when nothing is left."""
        wanted = ScopeSet.parse(requested)
        granted: list[Scope] = []
        for asked in wanted.scopes:
            for allowed in self.scopes:
                part = asked.intersect(allowed)
                if part is not None and part not in granted:
                    granted.append(part)
        if not granted:
            raise InvalidScope("none of the requested scopes is granted to this client")
        extras = tuple(e for e in wanted.extras if e in self.extras)
        return ScopeSet(tuple(granted), extras)
