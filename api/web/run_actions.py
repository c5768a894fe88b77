"""What the dashboard's buttons do to a run: cancel it, retrain from its spec, or promote it to
its template's champion. They go through `api.runs.service` and `api.templates.champions`, as
the REST API does; a refusal (a run already finished, a failed gate) shows the run's page again
with the reason, with the status the API would have answered."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlmodel import Session
from starlette.datastructures import FormData

from api.auth.access import principal_of
from api.config import Settings
from api.deps import SessionDep, SettingsDep
from api.errors import Problem
from api.runs import detail as detail_q
from api.runs import query as q
from api.runs import service as runs_service
from api.runs.models import RetrainRequest
from api.templates import champions as champions_service
from api.templates.models import PromoteRequest
from api.web.pages import checked_form, form_key, not_found, render
from api.web.run_view import page_context

router = APIRouter(include_in_schema=False)


@router.post("/runs/{run_id}/cancel", response_class=HTMLResponse)
async def cancel_run_form(
    request: Request, run_id: str, session: SessionDep, settings: SettingsDep
) -> Response:
    def cancel(form: FormData) -> str:
        runs_service.cancel_run(session, settings, run_id, reason="cancelled from the dashboard")
        return f"/runs/{run_id}?notice=cancel-requested"

    return await _act(request, session, settings, run_id, cancel)


@router.post("/runs/{run_id}/retrain", response_class=HTMLResponse)
async def retrain_run_form(
    request: Request, run_id: str, session: SessionDep, settings: SettingsDep
) -> Response:
    def retrain(form: FormData) -> str:
        new = runs_service.retrain_run(
            session, settings, run_id, RetrainRequest(), idempotency_key=form_key(form)
        )
        return f"/runs/{new.run.id}?notice=retrained"

    return await _act(request, session, settings, run_id, retrain)


@router.post("/runs/{run_id}/promote", response_class=HTMLResponse)
async def promote_run_form(
    request: Request, run_id: str, session: SessionDep, settings: SettingsDep
) -> Response:
    """The run becomes its template's champion. `force` (the "promote anyway" form of a run
    whose gate failed) goes with the note that says why, as over REST."""

    def promote(form: FormData) -> str:
        note = str(form.get("note") or "").strip()
        force = form.get("force") in ("1", "true", "on")
        try:
            body = PromoteRequest(note=note, force=force)
        except ValidationError:  # the one constraint a form can break: the note's length
            raise Problem(
                422, "Note too long", f"the note has {len(note)} characters; keep it to 2000"
            ) from None
        champions_service.promote(session, run_id, body, by=principal_of(request).name)
        return f"/runs/{run_id}?notice=promoted"

    return await _act(request, session, settings, run_id, promote, _promote_refusal)


def _promote_refusal(exc: Problem) -> str | None:
    if "gate_reasons" not in exc.extra:
        return None
    # Refused for its failed gate. The service's wording is for API clients ("send
    # force=true"); say it in the page's.
    return (
        "Gate failed: this run failed its quality gate (the checks are listed below), "
        "so it is not promoted. To make it champion anyway, use “Promote anyway” "
        "with a note saying why."
    )


async def _act(
    request: Request,
    session: Session,
    settings: Settings,
    run_id: str,
    action: Callable[[FormData], str],
    wording: Callable[[Problem], str | None] = lambda exc: None,
) -> Response:
    """Check the button's form, do `action` (it returns where to go next) and go there; a
    refusal shows the run's page again with the reason (in `wording`'s words if it has any)."""
    form = await _run_form(request, session, run_id)
    if isinstance(form, HTMLResponse):
        return form
    try:
        target = action(form)
    except Problem as exc:
        return _run_with_error(request, session, settings, run_id, exc, wording(exc))
    return RedirectResponse(target, status_code=303)


async def _run_form(request: Request, session: Session, run_id: str) -> FormData | HTMLResponse:
    """The POSTed form of a button on a run's page, or the page to answer instead: 403 for a
    bad CSRF token, 404 for a run that does not exist."""
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    if q.run_row(session, run_id) is None:
        return not_found(request, run_id)
    return form


def _run_with_error(
    request: Request,
    session: Session,
    settings: Settings,
    run_id: str,
    exc: Problem,
    message: str | None = None,
) -> HTMLResponse:
    session.rollback()
    detail = detail_q.run_detail(session, run_id)
    if detail is None:
        return not_found(request, run_id)
    if message is None:
        message = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
    return render(
        request,
        "run.html",
        exc.status,
        page_error=message,
        **page_context(request, session, detail, settings),
    )
