"""Gateway authentication: SMART Backend Services token endpoint and bearer checks on FHIR requests."""

from gateway.auth.clients import (
    METADATA,
    RegisteredClient,
    create_client,
    get_client,
    list_clients,
    mark_used,
    purge_expired_jtis,
    remember_jti,
    rotate_secret,
    set_enabled,
    set_jwks,
    verify_secret,
)
from gateway.auth.external import ExternalIssuer, ExternalIssuerConfig
from gateway.auth.lockout import LockoutPolicy
from gateway.auth.router import Authenticated, AuthSettings, authenticate, build_auth_router
from gateway.auth.scopes import InvalidScope, Scope, ScopeSet
from gateway.auth.tokens import (
    JwksFetcher,
    OAuthError,
    issue_access_token,
    verify_access_token,
    verify_client_assertion,
)

__all__ = [
    "METADATA",
    "AuthSettings",
    "Authenticated",
    "ExternalIssuer",
    "ExternalIssuerConfig",
    "InvalidScope",
    "JwksFetcher",
    "LockoutPolicy",
    "OAuthError",
    "RegisteredClient",
    "Scope",
    "ScopeSet",
    "authenticate",
    "build_auth_router",
    "create_client",
    "get_client",
    "issue_access_token",
    "list_clients",
    "mark_used",
    "purge_expired_jtis",
    "remember_jti",
    "rotate_secret",
    "set_enabled",
    "set_jwks",
    "verify_access_token",
    "verify_client_assertion",
    "verify_secret",
]
