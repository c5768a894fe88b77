"""Dashboard pages of run templates: each template's current version, gates, champion, the
champion history and its recent runs with their gates. Read-only: templates are edited over REST
(`PUT /api/v1/templates/{name}`), which keeps every version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse
from sqlmodel import col, select

from api.deps import SessionDep
from api.errors import Problem
from api.models import Run
from api.models.templates import TEMPLATE_NAME
from api.services import champions
from api.services import templates as service

router = APIRouter(include_in_schema=False)

RECENT_RUNS = 25


def _render(
    request: Request, template: str, status_code: int = 200, **context: object
) -> HTMLResponse:
    from api.routes.dashboard import render  # the dashboard's layout, headers and CSRF cookie

    return render(request, template, status_code, **context)


@router.get("/templates", response_class=HTMLResponse)
def templates_page(request: Request, session: SessionDep) -> HTMLResponse:
    rows = []
    for template in service.list_templates(session):
        champion = session.get(Run, template.champion_run_id) if template.champion_run_id else None
        rows.append({"t": template, "champion": champion})
    return _render(request, "run_templates.html", rows=rows)


@router.get("/templates/{name}", response_class=HTMLResponse)
def template_page(
    request: Request, session: SessionDep, name: Annotated[str, Path(pattern=TEMPLATE_NAME)]
) -> HTMLResponse:
    try:
        template = service.get_template(session, name)
    except Problem as exc:
        from api.routes.dashboard import error_page

        return error_page(request, exc.status, "Template not found", exc.detail or "")
    runs = session.exec(
        select(Run)
        .where(Run.template_name == name)
        .order_by(col(Run.created_at).desc())
        .limit(RECENT_RUNS)
    ).all()
    return _render(
        request,
        "run_template.html",
        t=template,
        gates=template.gates.model_dump(exclude_defaults=True),
        history=champions.history(session, name),
        versions=service.list_versions(session, name),
        runs=runs,
    )
