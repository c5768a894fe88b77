"""The dashboard's session cookie: `v1.<token id>.<expiry, unix seconds>.<HMAC>`, stateless, so
any replica accepts it, and tied to the token, so revoking the token ends every session made
with it at the next request (api/auth/access.py `dashboard_access` checks it)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from fastapi import Request
from starlette.responses import Response

from api.auth.network_guard import is_loopback
from api.config import Settings

SESSION_COOKIE = "tuneplane_session"


def _session_key(settings: Settings) -> bytes:
    # A key of its own, derived from the api's signing key (same reasoning as api/auth/csrf.py).
    return hmac.new(settings.signing_key, b"tuneplane/session/v1", hashlib.sha256).digest()


def _session_sig(settings: Settings, body: str) -> str:
    digest = hmac.new(_session_key(settings), body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def make_session(settings: Settings, token_id: str, now: float | None = None) -> str:
    expires = int((now or time.time()) + settings.session_hours * 3600)
    body = f"v1.{token_id}.{expires}"
    return f"{body}.{_session_sig(settings, body)}"


def read_session(settings: Settings, value: str, now: float | None = None) -> str | None:
    """The token id a session cookie names, or None if it is forged, malformed or expired."""
    parts = value.split(".")
    if len(parts) != 4 or parts[0] != "v1" or not parts[2].isdigit():
        return None
    body = ".".join(parts[:3])
    if not hmac.compare_digest(parts[3], _session_sig(settings, body)):
        return None
    if int(parts[2]) < (now or time.time()):
        return None
    return parts[1]


def cookie_is_secure(request: Request) -> bool:
    """`Secure` everywhere except plain http to a loopback address (the embedded default),
    where browsers would otherwise drop the cookie. Behind a TLS-terminating proxy the request
    looks like http to a public name, so the cookie is marked Secure there too."""
    host = request.url.hostname or ""
    return not (request.url.scheme == "http" and is_loopback(host))


def set_session_cookie(
    request: Request, response: Response, settings: Settings, token_id: str
) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        make_session(settings, token_id),
        max_age=int(settings.session_hours * 3600),
        httponly=True,
        secure=cookie_is_secure(request),
        # Lax, not Strict: a link to a run's page from a CI log must find the session; a
        # cross-site POST still never carries it (and dashboard forms carry a CSRF token too).
        samesite="lax",
        path="/",
    )


def clear_session_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, secure=cookie_is_secure(request), samesite="lax"
    )
