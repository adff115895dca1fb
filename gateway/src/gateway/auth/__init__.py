"""Gateway authentication: SMART Backend Services token endpoint and bearer checks on FHIR requests."""

from gateway.auth.clients import (
    METADATA,
    RegisteredClient,
    create_client,
    get_client,
    purge_expired_jtis,
    remember_jti,
    set_enabled,
    verify_secret,
)
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
    "InvalidScope",
    "JwksFetcher",
    "OAuthError",
    "RegisteredClient",
    "Scope",
    "ScopeSet",
    "authenticate",
    "build_auth_router",
    "create_client",
    "get_client",
    "issue_access_token",
    "purge_expired_jtis",
    "remember_jti",
    "set_enabled",
    "verify_access_token",
    "verify_client_assertion",
    "verify_secret",
]
