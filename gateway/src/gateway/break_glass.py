"""Break-the-glass: an emergency read outside the normal access rules (ARCHITECTURE.md §5).

The client states its reason in the `X-Break-Glass-Reason` header. Only clients registered with
the `alliance/break-glass` scope may do so, only to read (GET), and the reason must say
something. The gateway then signs the reason into the caller's identity: the services show
everything to such a read, and the audit records it with purpose BTG and names the patient's
managing organization so that it sees the access (docs/security.md).
"""

import dataclasses

from fastapi import Request

from fhirkit.errors import Forbidden, InvalidRequest
from gateway.auth import Authenticated
from gateway.auth.router import BREAK_GLASS_ROLE

HEADER = "X-Break-Glass-Reason"
MIN_REASON_CHARS, MAX_REASON_CHARS = 4, 500


def break_glass(request: Request, auth: Authenticated) -> Authenticated:
    raw = request.headers.get(HEADER)
    if raw is None:
        return auth
    if BREAK_GLASS_ROLE not in auth.identity.roles:
        raise Forbidden(f"{HEADER} needs a client registered for break-the-glass (scope alliance/break-glass)")
    if request.method != "GET":
        raise Forbidden("Break-the-glass opens reads only; writes follow the normal rules")
    reason = _decoded(raw).strip()
    if any(ord(c) < 32 for c in reason) or not MIN_REASON_CHARS <= len(reason) <= MAX_REASON_CHARS:
        raise InvalidRequest(f"{HEADER} must state the reason in {MIN_REASON_CHARS} to {MAX_REASON_CHARS} characters")
    return Authenticated(dataclasses.replace(auth.identity, break_glass=reason), auth.scopes)


def _decoded(raw: str) -> str:
    """Headers travel as Latin-1; a Chinese reason is sent percent-encoded (UTF-8)."""
    from urllib.parse import unquote

    try:
        return unquote(raw, encoding="utf-8", errors="strict") if "%" in raw else raw
    except UnicodeDecodeError:
        raise InvalidRequest(f"{HEADER} must be UTF-8 (percent-encoded)") from None
