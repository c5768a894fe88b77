"""The dashboard's template forms: create a template, and edit it (each save that changes
something is a new version, as `PUT /api/v1/templates/{name}`).

Every write goes through `api.templates.service`, the functions behind /api/v1/templates, so
both doors apply the same rules. The spec fields are the new-run form's (`forms`);
the gate fields are built the same way from `Gates`. A form with errors is shown again with what
was typed and each error beside its field. With auth on, `dashboard_access` lets only a session
with `runs:write` (what the REST routes need) submit these forms.

Webhooks are a list of URLs, one a line. Their secrets are never shown, and their URLs only as
scheme and host and the hook's tag (`template_url`: a receiver's credential is often the path).
A line left as it is shown keeps that webhook's whole URL and own secret, and a URL typed whole
that the template already has keeps its own secret too: the service resolves both
(`service._webhooks`), for an edit against the current version and for a Copy against the
template copied. A new URL is signed with the server's TUNEPLANE_WEBHOOK_SECRET (a per-webhook
secret is set over REST).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from api.auth.access import principal_of
from api.config import Settings
from api.deps import SessionDep, SettingsDep
from api.errors import Problem
from api.templates import service
from api.templates.gates import Gates
from api.templates.models import TemplateBody, TemplateCreate, TemplatePublic
from api.web.forms import (
    FormField,
    field_errors,
    form_field,
    form_value,
    parse_fields,
    spec_defaults,
    spec_fields,
)
from api.web.pages import checked_form
from api.web.template_pages import Name, missing, render_page
from trainer.contract.spec import RunSpec, describe_errors

router = APIRouter(include_in_schema=False)

# `_new`, not `new`: "new" is a valid template name, and that template's page must stay
# reachable; a name cannot start with "_".
NEW = "/templates/_new"
GATE_LABELS = {
    "min_accuracy": "Minimum accuracy",
    "min_macro_f1": "Minimum macro F1",
    "max_unknown_rate": "Maximum unknown rate",
    "no_worse_than_champion": "No worse than the champion (McNemar)",
    "significance": "Significance",
    "max_class_f1_drop": "Largest drop of one class's F1",
    "min_class_support": "Samples a class needs",
    "auto_promote": "Make each passing run the champion",
}
OWN_FIELDS = ("name", "description", "webhooks", "auto_promote")


def gate_fields() -> list[FormField]:
    """The gate inputs (`gates.NAME`) and auto-promotion, from the models themselves."""
    fields = [form_field(n, Gates, "gates.", GATE_LABELS) for n in Gates.model_fields]
    return [*fields, form_field("auto_promote", TemplateBody, labels=GATE_LABELS)]


def _labels(groups: list[tuple[str, list[FormField]]]) -> dict[str, str]:
    labels = {f.name: f.label for _, fields in groups for f in fields}
    labels.update({f.name: f.label for f in gate_fields()})
    return {**labels, "name": "Name", "description": "Description", "webhooks": "Webhooks"}


def _values(t: TemplatePublic | None, settings: Settings) -> dict[str, Any]:
    """The form prefilled from a template, or at the defaults."""
    values = spec_defaults(t.spec if t else None)
    if t is None:
        values["gpu_type"] = settings.default_gpu_type
    gates = t.gates if t else Gates()
    values.update({f.name: form_value(getattr(gates, f.field, None)) for f in gate_fields()})
    values.update(
        name=t.name if t else "",
        description=t.description if t else "",
        auto_promote=t.auto_promote if t else False,
        webhooks="\n".join(w.url for w in t.webhooks) if t else "",
    )
    return values


def _form(
    request: Request,
    t: TemplatePublic | None,
    values: dict[str, Any],
    errors: dict[str, str] | None = None,
    status_code: int = 200,
    page_error: str | None = None,
    source: TemplatePublic | None = None,
    copy_of: str | None = None,
) -> HTMLResponse:
    """`copy_of`: the template a new one is copied from, sent back with the form so that its
    redacted webhook URLs can be resolved (`source`, when given, is that template)."""
    groups = spec_fields()
    return render_page(
        request,
        "template_form.html",
        status_code,
        t=t,
        source=source,
        copy_of=source.name if source else copy_of,
        groups=groups,
        gate_fields=gate_fields(),
        labels=_labels(groups),
        values=values,
        errors=errors or {},
        page_error=page_error,
    )


def _read(
    form: FormData, create: bool
) -> tuple[dict[str, Any], TemplateBody | None, dict[str, str]]:
    """(values to show again, the template's content, errors by input) from a submitted form.
    Spec and gates are validated on their own first, so each error names its input."""
    shown, spec_in = parse_fields(form, [f for _, fields in spec_fields() for f in fields])
    gates_shown, gates_in = parse_fields(form, gate_fields())
    shown.update(gates_shown)
    own = {k: str(form.get(k) or "").strip() for k in ("name", "description", "webhooks")}
    shown.update(own)
    urls = [line.strip() for line in own["webhooks"].splitlines() if line.strip()]
    errors: dict[str, str] = {}
    spec: RunSpec | dict[str, Any] = spec_in
    gates: Gates | dict[str, Any] = {}
    try:
        spec = RunSpec.model_validate(spec_in)
    except ValidationError as exc:
        errors.update(field_errors(describe_errors(exc)))
    try:
        gates = Gates.model_validate({k: v for k, v in gates_in.items() if k != "auto_promote"})
    except ValidationError as exc:
        errors.update({k: m for k, m in _gate_errors(exc).items() if k not in errors})
    content = {
        "spec": spec,
        "gates": gates,
        "description": own["description"],
        "auto_promote": gates_in.get("auto_promote", False),
        # No secret: the service keeps each stored hook's own (`service._webhooks`).
        "webhooks": [{"url": u} for u in urls],
    }
    try:
        if create:
            body: TemplateBody = TemplateCreate.model_validate({"name": own["name"], **content})
        else:
            body = TemplateBody.model_validate(content)
    except ValidationError as exc:
        for err in describe_errors(exc):
            parts = err["field"].split(".")
            if parts[0] == "webhooks" and len(parts) > 2 and parts[1].isdigit():
                url = urls[int(parts[1])]
                errors.setdefault("webhooks", f"{url!r} is not an http:// or https:// URL")
            elif parts[0] == "name" and "pattern" in err["message"]:
                errors.setdefault("name", f"use {TemplateCreate.model_fields['name'].description}")
            elif parts[0] in OWN_FIELDS:
                errors.setdefault(parts[0], err["message"])
        return shown, None, errors
    return shown, (None if errors else body), errors


def _gate_errors(exc: ValidationError) -> dict[str, str]:
    """Errors of the gates by input (`gates.NAME`); a number out of range names the whole
    range, as the spec's fields do."""
    out: dict[str, str] = {}
    for err in describe_errors(exc, Gates):
        out.setdefault(f"gates.{err['field']}", err["message"])
    return out


def _problem_errors(exc: Problem) -> dict[str, str]:
    listed = exc.extra.get("errors")
    if not isinstance(listed, list):
        return {}
    return field_errors([e for e in listed if isinstance(e, dict)], nested=("gates",))


# ---- create ------------------------------------------------------------------------------------


@router.get(NEW, response_class=HTMLResponse)
def new_template_page(request: Request, session: SessionDep, settings: SettingsDep) -> HTMLResponse:
    source_name = request.query_params.get("from")
    source = None
    if source_name:
        try:
            source = service.get_template(session, source_name)
        except Problem as exc:
            return missing(request, exc)
    values = _values(source, settings)
    values["name"] = ""
    return _form(request, None, values, source=source)


@router.post(NEW, response_class=HTMLResponse)
async def create_template_form(
    request: Request, session: SessionDep, settings: SettingsDep
) -> Response:
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    shown, body, errors = _read(form, create=True)
    # The template the Copy page was for: its shown lines resolve against it alone (each names
    # one of its hooks by tag). A `from` changed by hand reads nothing the caller cannot read:
    # templates have no permissions of their own, and a dashboard session has runs:read.
    copy_of = str(form.get("from") or "") or None
    if body is None or errors:
        message = "Fix the fields marked below."
        return _form(request, None, shown, errors, 422, message, copy_of=copy_of)
    assert isinstance(body, TemplateCreate)
    try:
        created = service.create_template(
            session, body, settings, created_by=principal_of(request).name, copy_of=copy_of
        )
    except Problem as exc:
        session.rollback()
        errors = _problem_errors(exc)
        if exc.status == 409:
            errors["name"] = "a template with this name exists; pick another or edit that one"
        message = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
        return _form(request, None, shown, errors, exc.status, message, copy_of=copy_of)
    return RedirectResponse(f"/templates/{created.name}?notice=template-created", status_code=303)


# ---- edit --------------------------------------------------------------------------------------


@router.get("/templates/{name}/edit", response_class=HTMLResponse)
def edit_template_page(
    request: Request, session: SessionDep, settings: SettingsDep, name: Name
) -> HTMLResponse:
    try:
        t = service.get_template(session, name)
    except Problem as exc:
        return missing(request, exc)
    return _form(request, t, _values(t, settings))


@router.post("/templates/{name}/edit", response_class=HTMLResponse)
async def edit_template_form(
    request: Request, session: SessionDep, settings: SettingsDep, name: Name
) -> Response:
    form = await checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    try:
        t = service.get_template(session, name)
    except Problem as exc:
        return missing(request, exc)
    shown, body, errors = _read(form, create=False)
    shown["name"] = name
    if body is None or errors:
        return _form(request, t, shown, errors, 422, "Fix the fields marked below.")
    try:
        _, changed = service.update_template(
            session, name, body, settings, created_by=principal_of(request).name
        )
    except Problem as exc:
        session.rollback()
        if exc.status == 404:  # deleted while the form was open
            return missing(request, exc)
        message = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
        return _form(request, t, shown, _problem_errors(exc), exc.status, message)
    notice = "template-saved" if changed else "template-unchanged"
    return RedirectResponse(f"/templates/{name}?notice={notice}", status_code=303)
