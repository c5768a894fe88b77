"""Who may do what: API tokens, scopes, the dashboard's session cookie, and the open mode.

Tokens are `tp_` + 43 URL-safe characters (32 random bytes). The database keeps only the hex
SHA-256 of a token. Why plain SHA-256 and not a slow or peppered hash: a token carries 256 bits
of randomness, so a stolen table of hashes can be neither brute-forced nor looked up in a
dictionary, whatever the hash costs. Slow hashes (bcrypt, argon2) protect low-entropy passwords
and would add ~100 ms to every request; a pepper would add a second secret whose loss or rotation
silently invalidates every token, for no gain against 256-bit secrets. The lookup goes through a
unique index on the hash, so a timing difference there reveals at most part of a hash.

Scopes: `runs:read` (every GET under /api/v1), `runs:write` (every other method), `admin` (the
tokens resource; it also grants both others). The trainer's callback endpoint is exempt: it
checks a per-run credential of its own (api/events/routes.py).

Open mode (`auth_enabled` off) is for the embedded default bound to loopback: everyone may do
everything. `check_exposure` keeps `tuneplane serve` from offering that to a network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.responses import Response

from api.config import Settings
from api.deps import EngineDep, SettingsDep
from api.errors import Problem

TOKEN_PREFIX = "tp_"
SCOPES = ("runs:read", "runs:write", "admin")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SESSION_COOKIE = "tuneplane_session"
# The callback endpoint: a concrete path or its route template, whatever the parameter's name.
_CALLBACK = re.compile(r"^/api/v1/runs/[^/]+/events/?$")
_TOKEN_SHAPE = re.compile(r"^tp_[A-Za-z0-9_-]{20,100}$")
_REALM = 'Bearer realm="tuneplane"'


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes, de-duplicated, or ValueError naming the unknown one and the allowed ones."""
    out = list(dict.fromkeys(s.strip() for s in scopes if s.strip()))
    if not out:
        raise ValueError(f"give at least one scope: {', '.join(SCOPES)}")
    for scope in out:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; the scopes are: {', '.join(SCOPES)}")
    return out


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs, from its method and path; None for the callback endpoint
    (per-run credential). Decided here, in one place, so that an endpoint added later is
    covered without anyone remembering to protect it."""
    if method == "POST" and _CALLBACK.match(path):
        return None
    if path == "/api/v1/tokens" or path.startswith("/api/v1/tokens/"):
        return "admin"
    return "runs:read" if method in SAFE_METHODS else "runs:write"


@dataclass(frozen=True)
class Principal:
    """Who is asking: a token (its id and name) or, in open mode, anybody."""

    name: str
    scopes: frozenset[str]
    token_id: str | None = None

    def can(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


OPEN = Principal(name="open-mode", scopes=frozenset(SCOPES))


def principal_of(request: Request) -> Principal:
    """The principal `authorize` (or `dashboard_access`) stored on the request."""
    principal: Principal = getattr(request.state, "principal", OPEN)
    return principal


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Problem(
            401,
            "Unauthorized",
            "the Authorization header must be `Bearer tp_...`",
            headers={"WWW-Authenticate": f'{_REALM}, error="invalid_request"'},
        )
    return value.strip()


def _unauthorized(detail: str) -> Problem:
    return Problem(
        401,
        "Unauthorized",
        detail,
        headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
    )


def resolve_token(engine: object, raw: str) -> Principal:
    """The principal of a raw token, or a 401 Problem saying what is wrong with it."""
    from api.auth.tokens import TokenRefused, authenticate

    if not _TOKEN_SHAPE.match(raw):
        raise _unauthorized("that is not a tuneplane API token (they start with `tp_`)")
    try:
        token = authenticate(engine, raw)  # type: ignore[arg-type]
    except TokenRefused as exc:
        raise _unauthorized(str(exc)) from None
    return Principal(name=token.name, scopes=frozenset(token.scopes), token_id=token.id)


def authorize(request: Request, settings: SettingsDep, engine: EngineDep) -> None:
    """The /api/v1 router's dependency: checks the token against `required_scope`."""
    # The path the app routed on (without a proxy's root_path). This runs only for a request
    # that matched a route of the /api/v1 router, so the path is one of its endpoints.
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    needed = required_scope(request.method, path)
    if needed is None:
        return
    if not settings.auth_enabled:
        request.state.principal = OPEN
        return
    raw = _bearer(request)
    if raw is not None:
        principal = resolve_token(engine, raw)
    elif request.method in SAFE_METHODS and request.cookies.get(SESSION_COOKIE):
        # The dashboard's own pages poll the JSON API with their session cookie; only reads,
        # so a forged cross-site request can never change anything through the cookie.
        principal = _session_principal(request, settings, engine)
    else:
        raise Problem(
            401,
            "Unauthorized",
            "this endpoint needs an API token: send `Authorization: Bearer tp_...` "
            "(an admin makes one with `tuneplane token create`)",
            headers={"WWW-Authenticate": _REALM},
        )
    if not principal.can(needed):
        raise Problem(
            403,
            "Forbidden",
            f"token {principal.name!r} lacks the scope {needed!r} "
            f"(it has: {', '.join(sorted(principal.scopes))})",
            headers={"WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{needed}"'},
        )
    request.state.principal = principal


AuthDep = Annotated[None, Depends(authorize)]


# ---- the dashboard's session cookie ---------------------------------------------------------
#
# `v1.<token id>.<expiry, unix seconds>.<HMAC>`: stateless, so any replica accepts it, and tied
# to the token, so revoking the token ends every session made with it at the next request.


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


def _session_principal(request: Request, settings: Settings, engine: object) -> Principal:
    from api.auth.tokens import TokenRefused, authenticate_id

    token_id = read_session(settings, request.cookies.get(SESSION_COOKIE, ""))
    if token_id is None:
        raise _unauthorized("your dashboard session has expired; log in again at /login")
    try:
        token = authenticate_id(engine, token_id)  # type: ignore[arg-type]
    except TokenRefused as exc:
        raise _unauthorized(str(exc)) from None
    return Principal(name=token.name, scopes=frozenset(token.scopes), token_id=token.id)


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


class LoginRequired(Exception):
    """A dashboard page asked for without a usable session: the app redirects to /login.
    `why` is a code (`required`, `expired`, `scope`): the login page words it, so that no text
    from a URL is ever shown as if it came from tuneplane."""

    def __init__(self, next_path: str, why: str) -> None:
        super().__init__(why)
        self.next_path, self.why = next_path, why


# Assets the login page itself needs; everything else of the dashboard is behind the login.
_PUBLIC_PREFIXES = ("/static/", "/favicon")


def dashboard_access(request: Request, settings: SettingsDep, engine: EngineDep) -> None:
    """The dashboard router's dependency: with auth on, a page needs a session whose token has
    `runs:read` (`runs:write` to submit a form); without one the browser goes to /login."""
    if not settings.auth_enabled:
        request.state.principal = OPEN
        return
    if request.url.path.startswith(_PUBLIC_PREFIXES):
        return
    next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method not in SAFE_METHODS:
        # After logging in the browser comes back to a page, never to a form's POST target.
        next_path = "/"
    if not request.cookies.get(SESSION_COOKIE):
        raise LoginRequired(next_path, "required")
    try:
        principal = _session_principal(request, settings, engine)
    except Problem:
        raise LoginRequired(next_path, "expired") from None
    needed = "runs:read" if request.method in SAFE_METHODS else "runs:write"
    if not principal.can(needed):
        raise LoginRequired(next_path, "scope-write" if needed == "runs:write" else "scope")
    request.state.principal = principal


# ---- exposure --------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


class ExposureRefused(RuntimeError):
    pass


def check_exposure(host: str, settings: Settings) -> None:
    """Refuse to serve an open api (auth off) on anything but loopback, unless the operator said
    explicitly that something in front of it authenticates (`allow_open_network`)."""
    if settings.auth_enabled or settings.allow_open_network or is_loopback(host):
        return
    raise ExposureRefused(
        f"refusing to serve on {host} with authentication off: anyone who can reach this "
        "address could start and cancel runs. Turn it on (TUNEPLANE_AUTH_ENABLED=true, then make "
        "an admin token with `tuneplane token create --name admin --scopes admin`), bind to "
        "127.0.0.1, or, if a proxy in front of tuneplane authenticates every request, set "
        "TUNEPLANE_ALLOW_OPEN_NETWORK=true"
    )
