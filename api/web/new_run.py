"""The dashboard's new-run form: the form derived from `RunSpec` (GET `/runs/new`, optionally
prefilled from an earlier run), and its submission, validated field by field and shown again
with the errors beside the fields until it makes a run.

The field building (`spec_fields`, `form_field`), parsing (`parse_fields`), prefilling
(`spec_defaults`, `form_value`) and error mapping (`field_errors`) are public: the template
forms (`template_forms`) build the same spec fields, and their gate fields, with them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from api.deps import SessionDep, SettingsDep
from api.errors import Problem
from api.runs import query as q
from api.runs import service as runs_service
from api.runs.models import Run, RunCreate
from api.web.forms import field_errors, parse_fields, spec_defaults, spec_fields
from api.web.pages import checked_form, form_key, not_found, render, split_list
from trainer.contract.spec import RunSpec, describe_errors

router = APIRouter(include_in_schema=False)


def _parse_form(form: FormData) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(values to show again, spec input, run fields) from a submitted form."""
    shown, spec_in = parse_fields(form, [f for _, fields in spec_fields() for f in fields])
    run_fields = {k: str(form.get(k) or "").strip() for k in ("name", "tags", "notes")}
    shown.update(run_fields)
    return shown, spec_in, run_fields


def _new_form(
    request: Request,
    values: dict[str, Any],
    errors: dict[str, str] | None = None,
    status_code: int = 200,
    page_error: str | None = None,
    source: Run | None = None,
) -> HTMLResponse:
    groups = spec_fields()
    labels = {f.name: f.label for _, fields in groups for f in fields}
    labels.update(name="Name", tags="Tags", notes="Notes")
    return render(
        request,
        "new_run.html",
        status_code,
        groups=groups,
        labels=labels,
        values=values,
        errors=errors or {},
        page_error=page_error,
        source=source,
    )


@router.get("/runs/new", response_class=HTMLResponse)
def new_run_page(request: Request, session: SessionDep, settings: SettingsDep) -> HTMLResponse:
    source_id = request.query_params.get("from")
    source = q.run_row(session, source_id) if source_id else None
    if source_id and source is None:
        return not_found(request, source_id)
    values = spec_defaults(source.spec if source else None)
    if source is None:
        values["gpu_type"] = settings.default_gpu_type
    values.update(
        name=f"{source.name} (retrain)" if source and source.name else "", tags="", notes=""
    )
    if source is not None:
        values["tags"] = ", ".join(q.tags_of(session, [source.id]).get(source.id, []))
    return _new_form(request, values, source=source)


@router.post("/runs/new", response_class=HTMLResponse)
async def create_run_form(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    shown, spec_in, run_fields = _parse_form(form)
    errors: dict[str, str] = {}
    spec: RunSpec | None = None
    try:
        spec = RunSpec.model_validate(spec_in)
    except ValidationError as exc:
        errors.update(field_errors(describe_errors(exc)))
    body: RunCreate | None = None
    try:
        body = RunCreate.model_validate(
            {
                "spec": spec or spec_defaults(),  # checks name/tags/notes even if the spec fails
                "name": run_fields["name"],
                "tags": split_list(run_fields["tags"]),
                "notes": run_fields["notes"],
            }
        )
    except ValidationError as exc:
        for key, message in field_errors(describe_errors(exc)).items():
            if key in ("name", "tags", "notes"):
                errors.setdefault(key, message)
    if errors or body is None or spec is None:
        return _new_form(
            request, shown, errors, 422, page_error="Fix the fields marked below and submit again."
        )
    try:
        created = runs_service.create_run(session, settings, body, idempotency_key=form_key(form))
    except Problem as exc:
        extra = exc.extra.get("errors")
        if isinstance(extra, list):
            errors.update(field_errors([e for e in extra if isinstance(e, dict)]))
        return _new_form(
            request,
            shown,
            errors,
            exc.status,
            page_error=f"{exc.title}: {exc.detail or ''}".rstrip(": "),
        )
    return RedirectResponse(f"/runs/{created.run.id}?notice=created", status_code=303)
