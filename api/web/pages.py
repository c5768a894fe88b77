"""The dashboard: server-rendered HTML pages over the same tables and services as the REST API.

This module holds what every page shares: the Jinja environment, the layout's context (CSRF
token, form key, notices), the security headers, error pages and the checks of a POSTed form.
The pages themselves live beside it, one module per concern:

- `runs_list`: the runs list, the history and the comparison of runs;
- `new_run`: the new-run form, its validation and re-rendering (fields from `forms`);
- `run_page` (view models in `run_view`): one run's page, its live fragments, its log;
- `run_actions`: cancel, retrain and promote;
- `template_pages`, `template_forms`: templates, their editing and their trigger form;
- `login`: the login page; `format`: how values read (Jinja filters); `charts` (drawn with
  `chart_svg`): the SVG charts.

Route modules stay thin: they read through a domain's query module or service and hand the
result to a view model here; none queries the database itself (tests/api/test_layout.py).

Every page works with JavaScript off; `api/web/static/dashboard.js` only adds live updates of an
active run (polling `/runs/{id}/live`) and client-side table sorting. Reads come from
`api.runs.query`; writes (new run, cancel, retrain) go through `api.runs.service`, the
functions behind `/api/v1/runs`, so both doors apply the same rules. Forms carry a CSRF token
(`api/auth/csrf.py`); templates are autoescaped and charts escape their own text
(`api/web/charts.py`).
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.datastructures import FormData

from api.auth import csrf
from api.auth.access import principal_of
from api.deps import get_settings
from api.runs.states import ACTIVE, TERMINAL, RunStatus
from api.web import format as fmt

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
STATIC = Path(__file__).resolve().parent / "static"


def static_files() -> StaticFiles:
    """The CSS, script and icon of the pages, served by the api itself (no CDN)."""
    return StaticFiles(directory=STATIC)


# The pages load nothing from anywhere but this server, and nothing inline runs: even a string
# that escaped escaping could not execute. (Charts are inline SVG, which needs no exception.)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

FORM_KEY = "form_key"
NOTICES = {
    "created": "Run created. It is queued and starts when a GPU is free.",
    "cancel-requested": "Cancel requested.",
    "retrained": "Retrain started from the earlier run's spec.",
}


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "svg"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(fmt.FILTERS)
    env.globals.update(
        STATUS_ICONS=fmt.STATUS_ICONS,
        ACTIVE=ACTIVE,
        TERMINAL=TERMINAL,
        qs=fmt.qs,
        statuses=list(RunStatus),
    )
    return env


ENV = _env()


# ---- rendering --------------------------------------------------------------------------------


def layout_context(request: Request, path: str) -> dict[str, Any]:
    """What the layout of every page (and fragment) needs: its path, the CSRF token, a new
    idempotency key for its forms, and the token a signed-in browser uses (for "Log out")."""
    principal = principal_of(request)
    return {
        "request_path": path,
        "signed_in_as": principal.name if principal.token_id is not None else None,
        "csrf_field": csrf.FIELD,
        "csrf_token": csrf.token(request, get_settings(request)),
        "form_key_field": FORM_KEY,
        "form_key": secrets.token_urlsafe(18),
    }


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("notice", NOTICES.get(request.query_params.get("notice", "")))
    context.setdefault("page_error", None)
    html = ENV.get_template(template).render(**layout_context(request, request.url.path), **context)
    response = HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
    csrf.set_cookie(request, response)
    return response


def error_page(request: Request, status_code: int, title: str, detail: str) -> HTMLResponse:
    return render(request, "error.html", status_code, title=title, detail=detail)


def not_found(request: Request, run_id: str) -> HTMLResponse:
    return error_page(request, 404, "Run not found", f"There is no run with the id {run_id!r}.")


# ---- form input -------------------------------------------------------------------------------


async def checked_form(request: Request) -> FormData | HTMLResponse:
    """The POSTed form, or the 403 page when its CSRF token is not valid."""
    form = await request.form()
    try:
        csrf.verify(request, get_settings(request), form.get(csrf.FIELD))
    except csrf.CsrfError as exc:
        return error_page(request, 403, "Form expired or forged", str(exc))
    return form


def form_key(form: FormData) -> str | None:
    """The idempotency key a form was rendered with: a double-clicked submit (or a reload of the
    POST) makes one run, not two. Each page view renders a new key (pages are never cached)."""
    key = form.get(FORM_KEY)
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]{16,64}", key):
        return "dashboard:" + key
    return None


def split_list(text: str) -> list[str]:
    """A comma-separated entry (tags, target modules, run ids) as its non-empty items."""
    return [part.strip() for part in text.split(",") if part.strip()]
