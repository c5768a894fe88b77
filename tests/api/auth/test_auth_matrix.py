"""The auth matrix: every operation of the app's OpenAPI document, and every dashboard route,
against every kind of credential: none, malformed, wrong scope, read-only, revoked, expired and
the right one. Where a 401/403 belongs nothing answers 2xx (or, on the dashboard, anything but a
refusal or a redirect to the login), the right credential gets past authentication, and no cell
of the matrix is ever a 5xx. Routes come from the app itself, so a new one is in the matrix
without anyone adding it here."""

from __future__ import annotations

import re
import time

import httpx
from sqlmodel import select

from api.auth import csrf as csrf_module
from api.auth.models import ApiToken
from api.auth.sessions import SESSION_COOKIE, make_session
from api.db import session_scope
from tests.api.auth.test_auth import (
    WRONG,
    Secured,
    concrete,
    dashboard_pages,
    needed_scope,
    secured,  # noqa: F401 (the fixture)
)
from tests.api.factories import token_for

# Paths anyone may read: probes, the scrape target, the API's own description, the login.
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/login", "/logout"}
MALFORMED = ["Bearer", "Bearer garbage", "Basic dXNlcjpwYXNz", "Bearer tp_" + "x" * 5000, "tp_"]
KINDS = ["none", "malformed", "wrong", "read-only", "revoked", "expired", "right"]


def openapi_operations(s: Secured) -> list[tuple[str, str]]:
    doc = s.client.get("/openapi.json").json()
    ops = [
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]
    assert len(ops) >= 20, ops
    return ops


def api_headers(s: Secured, kind: str, method: str, path: str) -> list[dict[str, str]]:
    """The Authorization headers of one credential kind for one operation."""
    scope = needed_scope(method, path)
    bearer = {
        "wrong": "readwrite" if scope == "admin" else WRONG.get(scope, "admin"),
        "read-only": "read",
        "revoked": "revoked",
        "expired": "expired",
        "right": {"runs:read": "read", "runs:write": "write", "admin": "admin"}.get(scope),
    }
    if kind == "none":
        return [{}]
    if kind == "malformed":
        return [{"Authorization": m} for m in MALFORMED]
    if scope == "callback" and kind == "right":
        run_id = concrete(path).split("/")[4]
        return [{"Authorization": f"Bearer {token_for(s.settings, run_id)}"}]
    if scope == "callback":  # any API token, even admin, is refused there
        return [{"Authorization": f"Bearer {s.tokens[bearer.get(kind) or 'admin']}"}]
    return [{"Authorization": f"Bearer {s.tokens[str(bearer[kind])]}"}]


def api_expectation(kind: str, method: str, path: str) -> str:
    """`refused` (a 401/403 belongs) or `passes` (must get past authentication)."""
    scope = needed_scope(method, path)
    if kind == "right":
        return "passes"
    if kind == "read-only":
        return "passes" if scope == "runs:read" else "refused"
    return "refused"


def test_every_openapi_operation_times_every_credential(secured: Secured) -> None:  # noqa: F811
    wrong = []
    cells = 0
    for method, path in openapi_operations(secured):
        if path in PUBLIC:
            continue
        for kind in KINDS:
            expect = api_expectation(kind, method, path)
            for headers in api_headers(secured, kind, method, path):
                kw = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
                r = secured.client.request(method, concrete(path), headers=headers, **kw)
                cells += 1
                bad = r.status_code >= 500
                if expect == "refused":
                    bad |= r.status_code not in (401, 403)
                else:
                    bad |= r.status_code in (401, 403)
                if bad:
                    wrong.append(f"{kind} {method} {path}: {r.status_code} {r.text[:120]}")
    assert not wrong, "\n".join(wrong)
    assert cells > 150


def _token_id(s: Secured, name: str) -> str:
    with session_scope(s.engine) as session:
        return session.exec(select(ApiToken.id).where(ApiToken.name == name)).one()


def dashboard_cookies(s: Secured) -> dict[str, str]:
    """A session cookie of each kind (sessions are the dashboard's credential)."""
    past = time.time() - s.settings.session_hours * 3600 - 60
    return {
        "none": "",
        "malformed": "garbage.not-a-session",
        "wrong": make_session(s.settings, _token_id(s, "write")),  # no runs:read (pages)
        "read-only": make_session(s.settings, _token_id(s, "read")),
        "revoked": make_session(s.settings, _token_id(s, "revoked")),
        "expired": make_session(s.settings, _token_id(s, "admin"), now=past),
        "right": make_session(s.settings, _token_id(s, "admin")),
    }


def _refused(r: httpx.Response) -> bool:
    to_login = r.is_redirect and r.headers.get("location", "").startswith("/login")
    scope_redirect = r.is_redirect and "why=scope" in r.headers.get("location", "")
    return r.status_code in (401, 403) or to_login or scope_redirect


def test_every_dashboard_route_times_every_session(secured: Secured) -> None:  # noqa: F811
    cookies = dashboard_cookies(secured)
    client = secured.client
    client.cookies.clear()
    page = client.get("/", headers={"Cookie": f"{SESSION_COOKIE}={cookies['right']}"})
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert page.status_code == 200 and csrf is not None, page.text[:300]
    # The form's token is checked against the browser's CSRF cookie (api/auth/csrf.py).
    csrf_cookie = f"{csrf_module.COOKIE}={client.cookies.get(csrf_module.COOKIE)}"
    client.cookies.clear()
    wrong = []
    for method, path in dashboard_pages(secured.app):
        if path in PUBLIC:
            continue
        for kind, value in cookies.items():
            if kind == "wrong" and method == "POST":  # forms need runs:write: a read session
                value = cookies["read-only"]
            jar = [csrf_cookie] + ([f"{SESSION_COOKIE}={value}"] if value else [])
            headers = {"Cookie": "; ".join(jar)}
            data = {"csrf_token": csrf.group(1)} if method == "POST" else None
            r = client.request(
                method, concrete(path), headers=headers, data=data, follow_redirects=False
            )
            expect = (
                "passes"
                if kind == "right" or (kind == "read-only" and method == "GET")
                else ("refused")
            )
            bad = r.status_code >= 500
            bad |= (not _refused(r)) if expect == "refused" else _refused(r)
            if bad:
                wrong.append(f"{kind} {method} {path}: {r.status_code} {r.headers.get('location')}")
    assert not wrong, "\n".join(wrong)
