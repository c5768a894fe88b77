"""Cross-site request forgery protection for the dashboard's forms (signed double submit).

The browser holds a random nonce in a cookie; every form carries `HMAC(key, nonce)` in a hidden
field. Another site can make a browser *send* the cookie but can neither read it nor compute the
signature, so it cannot forge the field. The key is derived from the api's signing key, so a
token made by one replica is accepted by every other, and nothing is stored server-side.
`SameSite=Lax` on the cookie is a second line: a cross-site POST does not carry it at all.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from starlette.requests import Request
from starlette.responses import Response

from api.config import Settings

COOKIE = "tuneplane_csrf"
FIELD = "csrf_token"
_NONCE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


class CsrfError(Exception):
    """A POST without a valid token; the dashboard answers 403 with a page saying why."""


def _key(settings: Settings) -> bytes:
    # A key of its own, so a CSRF token can never double as a callback token or vice versa.
    return hmac.new(settings.signing_key, b"tuneplane/csrf/v1", hashlib.sha256).digest()


def _sign(settings: Settings, nonce: str) -> str:
    return hmac.new(_key(settings), nonce.encode(), hashlib.sha256).hexdigest()


def _nonce(request: Request) -> str:
    """The browser's nonce, or a new one remembered on the request until the response sets it."""
    nonce = request.cookies.get(COOKIE, "")
    if _NONCE.match(nonce):
        return nonce
    fresh: str | None = getattr(request.state, "csrf_new_nonce", None)
    if fresh is None:
        fresh = secrets.token_urlsafe(32)
        request.state.csrf_new_nonce = fresh
    return fresh


def token(request: Request, settings: Settings) -> str:
    """The hidden-field value for forms on the page being rendered."""
    return _sign(settings, _nonce(request))


def set_cookie(request: Request, response: Response) -> None:
    """Give the browser the nonce that `token` signed, if it did not have one."""
    fresh = getattr(request.state, "csrf_new_nonce", None)
    if fresh is not None:
        response.set_cookie(
            COOKIE,
            fresh,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )


def verify(request: Request, settings: Settings, submitted: object) -> None:
    """Raise CsrfError unless `submitted` is the signature of the browser's cookie nonce."""
    nonce = request.cookies.get(COOKIE, "")
    if not _NONCE.match(nonce):
        raise CsrfError(
            "your browser sent no form token cookie; reload the page (and allow cookies for "
            "this site) before submitting again"
        )
    if not isinstance(submitted, str) or not hmac.compare_digest(submitted, _sign(settings, nonce)):
        raise CsrfError(
            "the form's security token is missing or does not match; reload the page and "
            "submit again"
        )
