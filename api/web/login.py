"""The dashboard's login: a form that takes an API token and sets a session cookie.

With auth on (`TUNEPLANE_AUTH_ENABLED`), every dashboard page needs a session (api/auth/access.py,
`dashboard_access`); without one the browser is sent here, and back to the page after logging
in. The cookie is HttpOnly, SameSite=Lax (a link from a CI log to a run's page keeps the session;
no cross-site POST carries it, and every dashboard form has a CSRF token as well) and Secure
except on plain http to loopback. It names the token, not its secret, and dies with the token.
"""

from __future__ import annotations

import urllib.parse

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.auth import csrf
from api.auth.access import LoginRequired, resolve_token
from api.auth.sessions import clear_session_cookie, set_session_cookie
from api.deps import EngineDep, SettingsDep
from api.errors import Problem
from api.web.pages import render  # the dashboard's renderer: same layout and headers

router = APIRouter(include_in_schema=False)

WHY = {
    "required": "Log in with an API token to see the dashboard.",
    "expired": "Your session has ended (it expired, or its token was revoked). Log in again.",
    "scope": "That token cannot read runs (it lacks runs:read). Log in with one that can.",
    "scope-write": "That token cannot change runs (it lacks runs:write). Log in with one that can.",
    "logged-out": "You are logged out.",
}


def _safe_next(value: str | None) -> str:
    """Only a path on this server: an open redirect would make the login page a phishing aid."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    if any(ord(c) < 0x20 for c in value):
        return "/"
    return value


def _page(
    request: Request, status_code: int, next_path: str, notice: str | None, error: str | None
) -> HTMLResponse:
    return render(
        request,
        "login.html",
        status_code,
        next_path=next_path,
        notice=notice,
        page_error=error,
        auth_enabled=request.app.state.settings.auth_enabled,
    )


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None, why: str | None = None) -> Response:
    return _page(request, 200, _safe_next(next), WHY.get(why or ""), None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, settings: SettingsDep, engine: EngineDep) -> Response:
    form = await request.form()
    next_path = _safe_next(str(form.get("next") or "/"))
    try:
        csrf.verify(request, settings, form.get(csrf.FIELD))
    except csrf.CsrfError as exc:
        return _page(request, 403, next_path, None, str(exc))
    if not settings.auth_enabled:
        return RedirectResponse(next_path, status_code=303)
    raw = str(form.get("token") or "").strip()
    if not raw:
        return _page(request, 400, next_path, None, "Paste an API token (it starts with tp_).")
    try:
        principal = resolve_token(engine, raw)
    except Problem as exc:
        return _page(request, 401, next_path, None, exc.detail)
    if not principal.can("runs:read"):
        return _page(request, 403, next_path, None, WHY["scope"])
    response = RedirectResponse(next_path, status_code=303)
    assert principal.token_id is not None
    set_session_cookie(request, response, settings, principal.token_id)
    return response


@router.post("/logout")
async def logout(request: Request, settings: SettingsDep) -> Response:
    form = await request.form()
    try:
        csrf.verify(request, settings, form.get(csrf.FIELD))
    except csrf.CsrfError as exc:
        return _page(request, 403, "/", None, str(exc))
    response = RedirectResponse("/login?why=logged-out", status_code=303)
    clear_session_cookie(request, response)
    return response


def install(app: FastAPI) -> None:
    """Add the login routes and turn `LoginRequired` into a redirect to the form."""
    app.include_router(router)

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, exc: LoginRequired) -> Response:
        query = urllib.parse.urlencode({"next": exc.next_path, "why": exc.why})
        return RedirectResponse(f"/login?{query}", status_code=303)
