"""Dashboard pages of run templates: the list, and each template's current version, gates,
champion, champion history, versions and recent runs, with its two buttons: start a run of it
(as `POST /api/v1/templates/{name}/runs`) and delete (hide) it (as `DELETE`). Both go through
`api.templates.service`; a refusal shows the page again with the reason beside its field.
The create and edit forms are in `template_forms`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlmodel import Session

from api.deps import SessionDep, SettingsDep
from api.errors import Problem
from api.runs import query as q
from api.templates import champions, service
from api.templates.models import TEMPLATE_NAME, TemplateRunRequest
from api.web.forms import field_errors
from api.web.pages import checked_form, error_page, form_key, render, split_list
from trainer.contract.spec import describe_errors

router = APIRouter(include_in_schema=False)

RECENT_RUNS = 25
Name = Annotated[str, Path(pattern=TEMPLATE_NAME)]

# Fixed words for `?notice=`: no text from a URL is ever shown as if tuneplane said it.
NOTICES = {
    "template-created": "Template created.",
    "template-saved": "Saved as a new version; runs already made keep the version they came from.",
    "template-unchanged": "Nothing changed, so no new version was made.",
    "template-deleted": "Template deleted. Its versions, runs and champions are kept; creating "
    "the name again continues its version numbers.",
}


def render_page(
    request: Request, template: str, status_code: int = 200, **context: Any
) -> HTMLResponse:
    context.setdefault("notice", NOTICES.get(request.query_params.get("notice", "")))
    return render(request, template, status_code, **context)


def missing(request: Request, exc: Problem) -> HTMLResponse:
    return error_page(request, exc.status, exc.title, exc.detail or "")


@router.get("/templates", response_class=HTMLResponse)
def templates_page(request: Request, session: SessionDep) -> HTMLResponse:
    rows = []
    for template in service.list_templates(session):
        champion = (
            q.run_row(session, template.champion_run_id) if template.champion_run_id else None
        )
        rows.append({"t": template, "champion": champion})
    return render_page(request, "run_templates.html", rows=rows)


def page_context(session: Session, name: str) -> dict[str, Any]:
    """What run_template.html shows of a template (a 404 Problem if there is none), with its
    start-a-run form empty and without errors."""
    template = service.get_template(session, name)
    runs = service.recent_runs(session, name, RECENT_RUNS)
    return {
        "t": template,
        "gates": template.gates.model_dump(exclude_defaults=True),
        "history": champions.history(session, name),
        "versions": service.list_versions(session, name),
        "runs": runs,
        "values": {},
        "errors": {},
    }


@router.get("/templates/{name}", response_class=HTMLResponse)
def template_page(request: Request, session: SessionDep, name: Name) -> HTMLResponse:
    try:
        context = page_context(session, name)
    except Problem as exc:
        return missing(request, exc)
    return render_page(request, "run_template.html", **context)


# ---- the page's buttons: start a run, delete -------------------------------------------------


def _page_with_errors(
    request: Request,
    session: Session,
    name: str,
    status_code: int,
    message: str,
    errors: dict[str, str] | None = None,
    values: dict[str, str] | None = None,
) -> HTMLResponse:
    session.rollback()
    try:
        context = page_context(session, name)
    except Problem as exc:
        return missing(request, exc)
    context.update(errors=errors or {}, values=values or {})
    return render_page(request, "run_template.html", status_code, page_error=message, **context)


@router.post("/templates/{name}/delete", response_class=HTMLResponse)
async def delete_template_form(request: Request, session: SessionDep, name: Name) -> Response:
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    if form.get("confirm") != "yes":
        why = "tick the box to confirm the deletion"
        return _page_with_errors(
            request, session, name, 400, why.capitalize() + ".", {"confirm": why}
        )
    try:
        service.delete_template(session, name)
    except Problem as exc:
        session.rollback()
        return missing(request, exc)
    return RedirectResponse("/templates?notice=template-deleted", status_code=303)


@router.post("/templates/{name}/runs", response_class=HTMLResponse)
async def trigger_template_form(
    request: Request, session: SessionDep, settings: SettingsDep, name: Name
) -> Response:
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    values = {k: str(form.get(k) or "").strip() for k in ("run_name", "tags", "notes")}
    try:
        run_request = TemplateRunRequest.model_validate(
            {
                "name": values["run_name"] or None,
                "tags": split_list(values["tags"]) or None,
                "notes": values["notes"] or None,
            }
        )
        created, _ = service.trigger_run(
            session,
            settings,
            name,
            run_request,
            idempotency_key=form_key(form),
        )
    except ValidationError as exc:
        errors = _run_errors(describe_errors(exc))
        return _page_with_errors(
            request, session, name, 422, "Fix the fields marked below.", errors, values
        )
    except Problem as exc:
        if exc.status == 404:
            session.rollback()
            return missing(request, exc)
        listed = exc.extra.get("errors")
        errors = _run_errors(
            [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
        )
        message = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
        return _page_with_errors(request, session, name, exc.status, message, errors, values)
    return RedirectResponse(f"/runs/{created.run_id}?notice=created", status_code=303)


def _run_errors(errors: list[dict[str, str]]) -> dict[str, str]:
    """Errors of a start-a-run request by input: its `name` is the input `run_name`."""
    out: dict[str, str] = {}
    for key, message in field_errors(errors).items():
        if key in ("name", "tags", "notes"):
            out.setdefault("run_name" if key == "name" else key, message)
    return out
