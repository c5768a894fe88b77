"""Who may do what: scopes, the dashboard's access, and the open mode. The tokens themselves
(their shape, hash and rows) are api/auth/tokens.py, the session cookie api/auth/sessions.py.

Scopes: `runs:read` (every GET under /api/v1), `runs:write` (every other method), `admin` (the
tokens resource; it also grants both others). The trainer's callback endpoint is exempt: it
checks a per-run credential of its own (api/events/routes.py).

Open mode (`auth_enabled` off) is for the embedded default bound to loopback: everyone may do
everything. `check_exposure` (api/auth/network_guard.py) keeps `tuneplane serve` from offering
that to a network.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine

from api.auth.models import ApiToken
from api.auth.sessions import SESSION_COOKIE, read_session
from api.auth.tokens import (
    SCOPES,
    TOKEN_SHAPE,
    TokenRefused,
    authenticate,
    authenticate_id,
)
from api.config import Settings
from api.deps import EngineDep, SettingsDep, in_database_thread
from api.errors import Problem

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The callback endpoints (one event, a batch): a concrete path or its route template, whatever
# the parameter's name.
_CALLBACK = re.compile(r"^/api/v1/runs/[^/]+/events(:batch)?/?$")
_REALM = 'Bearer realm="tuneplane"'


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


def _not_ours() -> Problem:
    return _unauthorized("that is not a tuneplane API token (they start with `tp_`)")


def resolve_token(engine: Engine, raw: str) -> Principal:
    """The principal of a raw token, or a 401 Problem saying what is wrong with it."""
    if not TOKEN_SHAPE.match(raw):
        raise _not_ours()
    return _principal(lambda: authenticate(engine, raw))


async def authorize(request: Request, settings: SettingsDep) -> None:
    """The /api/v1 router's dependency: checks the token against `required_scope`.
    Async, and holding no request slot of its own: the callback routes (their own credential,
    checked on the event loop) pass through with no thread hop and no slot, and an API token
    or a session is looked up in a worker thread holding a slot only while it is (the route's
    own session takes one afterwards; one at a time, so the two can never deadlock)."""
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
        if not TOKEN_SHAPE.match(raw):  # refused before it may wait for the database
            raise _not_ours()
        principal = await in_database_thread(request, resolve_token, raw)
    elif request.method in SAFE_METHODS and request.cookies.get(SESSION_COOKIE):
        # The dashboard's own pages poll the JSON API with their session cookie; only reads,
        # so a forged cross-site request can never change anything through the cookie.
        cookie = request.cookies.get(SESSION_COOKIE, "")
        principal = await in_database_thread(request, _cookie_principal, settings, cookie)
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


def _session_principal(request: Request, settings: Settings, engine: Engine) -> Principal:
    return _cookie_principal(engine, settings, request.cookies.get(SESSION_COOKIE, ""))


def _cookie_principal(engine: Engine, settings: Settings, cookie: str) -> Principal:
    """The principal of a dashboard session's cookie, or a 401 Problem."""
    token_id = read_session(settings, cookie)
    if token_id is None:
        raise _unauthorized("your dashboard session has expired; log in again at /login")
    return _principal(lambda: authenticate_id(engine, token_id))


def _principal(look_up: Callable[[], ApiToken]) -> Principal:
    """The principal of the token `look_up` finds; a 401 saying why it is refused."""
    try:
        token = look_up()
    except TokenRefused as exc:
        raise _unauthorized(str(exc)) from None
    return Principal(name=token.name, scopes=frozenset(token.scopes), token_id=token.id)


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
