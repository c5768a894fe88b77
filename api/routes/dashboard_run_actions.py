"""What the dashboard's buttons do to a run: cancel it, or retrain from its spec. Both go
through `api.services.runs`, as the REST API does; a refusal (a run already finished, say)
shows the run's page again with the reason, with the status the API would have answered."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from api.config import Settings
from api.deps import SessionDep, SettingsDep
from api.errors import Problem
from api.models import RetrainRequest
from api.routes.dashboard import checked_form, form_key, not_found, render
from api.routes.dashboard_run_view import run_context
from api.services import dashboard as q
from api.services import runs as runs_service

router = APIRouter(include_in_schema=False)


@router.post("/runs/{run_id}/cancel", response_class=HTMLResponse)
async def cancel_run_form(
    request: Request, run_id: str, session: SessionDep, settings: SettingsDep
) -> Response:
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    if q.get_run(session, run_id) is None:
        return not_found(request, run_id)
    try:
        runs_service.cancel_run(session, settings, run_id, reason="cancelled from the dashboard")
    except Problem as exc:
        return _run_with_error(request, session, settings, run_id, exc)
    return RedirectResponse(f"/runs/{run_id}?notice=cancel-requested", status_code=303)


@router.post("/runs/{run_id}/retrain", response_class=HTMLResponse)
async def retrain_run_form(
    request: Request, run_id: str, session: SessionDep, settings: SettingsDep
) -> Response:
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    if q.get_run(session, run_id) is None:
        return not_found(request, run_id)
    try:
        new = runs_service.retrain_run(
            session, settings, run_id, RetrainRequest(), idempotency_key=form_key(form)
        )
    except Problem as exc:
        return _run_with_error(request, session, settings, run_id, exc)
    return RedirectResponse(f"/runs/{new.run.id}?notice=retrained", status_code=303)


def _run_with_error(
    request: Request, session: Session, settings: Settings, run_id: str, exc: Problem
) -> HTMLResponse:
    session.rollback()
    detail = q.run_detail(session, run_id)
    if detail is None:
        return not_found(request, run_id)
    message = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
    return render(
        request,
        "run.html",
        exc.status,
        page_error=message,
        **run_context(request, detail, settings),
    )
