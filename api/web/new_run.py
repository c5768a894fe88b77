"""The dashboard's new-run form: the form derived from `RunSpec` (GET `/runs/new`, optionally
prefilled from an earlier run), and its submission, validated field by field and shown again
with the errors beside the fields until it makes a run.

The field building (`spec_fields`, `form_field`), parsing (`parse_fields`), prefilling
(`spec_defaults`, `form_value`) and error mapping (`field_errors`) are public: the template
forms (`template_forms`) build the same spec fields, and their gate fields, with them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData

from api.deps import SessionDep, SettingsDep
from api.errors import Problem
from api.runs import query as q
from api.runs import service as runs_service
from api.runs.models import Run, RunCreate
from api.web.pages import checked_form, form_key, not_found, render, split_list
from trainer.contract.spec import RunSpec, describe_errors, field_bounds

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class FormField:
    name: str  # the input's name, its id (`f-NAME`) and its key in values and errors
    label: str
    kind: Literal["text", "number", "checkbox", "select", "list"]
    required: bool
    help: str
    lo: float | None = None
    hi: float | None = None
    step: str = "1"
    options: tuple[str, ...] = ()
    key: str = ""  # the model's field, when `name` has a prefix ("gates.min_accuracy")
    nullable: bool = False  # left empty means None (a gate that is off), not an error

    @property
    def field(self) -> str:
        return self.key or self.name


FIELD_GROUPS: list[tuple[str, list[str]]] = [
    ("Model and data", ["model_id", "dataset", "train_size", "eval_size"]),
    ("Training", ["num_epochs", "learning_rate", "batch_size", "gradient_accumulation_steps",
                  "max_length", "gradient_checkpointing", "checkpointing", "micro_batch_size",
                  "quantization", "save_steps", "seed"]),
    ("LoRA", ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_vision"]),
    ("Evaluation", ["eval_mode", "eval_batch_size", "max_new_tokens"]),
    ("Execution", ["gpu_type", "time_budget_minutes"]),
]  # fmt: skip
LABELS = {
    "model_id": "Model",
    "dataset": "Data set",
    "lora_r": "LoRA rank (r)",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "lora_target_modules": "Target modules",
    "lora_vision": "LoRA on the vision tower too",
    "gpu_type": "GPU",
    "num_epochs": "Epochs",
    "max_new_tokens": "Max new tokens",
    "time_budget_minutes": "Time budget per segment (minutes)",
}


def spec_fields() -> list[tuple[str, list[FormField]]]:
    """The form, derived from `RunSpec.model_fields`: a field added to the spec shows up here
    (under "Other" until it is given a group) without touching the template."""
    fields = RunSpec.model_fields
    grouped = [name for _, names in FIELD_GROUPS for name in names]
    groups = [(title, [n for n in names if n in fields]) for title, names in FIELD_GROUPS]
    other = [n for n in fields if n not in grouped]
    if other:
        groups.append(("Other", other))
    out = []
    for title, names in groups:
        out.append((title, [form_field(n) for n in names]))
    return out


def form_field(
    name: str,
    model: type[BaseModel] = RunSpec,
    prefix: str = "",
    labels: Mapping[str, str] = LABELS,
) -> FormField:
    """The input for one field of `model`, named `prefix + name`."""
    info = model.model_fields[name]
    ann, nullable = _without_none(info.annotation)
    label = labels.get(name, name.replace("_", " ").capitalize())
    common: dict[str, Any] = {
        "name": prefix + name,
        "key": name if prefix else "",
        "nullable": nullable,
        "label": label,
        "required": info.is_required(),
        "help": info.description or "",
    }
    if ann is bool:
        return FormField(kind="checkbox", **common)
    if get_origin(ann) is Literal:
        return FormField(kind="select", options=tuple(str(a) for a in get_args(ann)), **common)
    if get_origin(ann) is list:
        return FormField(kind="list", **common)
    if ann in (int, float):
        lo, hi = field_bounds(name, model)
        return FormField(kind="number", lo=lo, hi=hi, step="1" if ann is int else "any", **common)
    return FormField(kind="text", **common)


def _without_none(ann: Any) -> tuple[Any, bool]:
    """(`X`, True) for `X | None`; (ann, False) for anything else."""
    if get_origin(ann) in (Union, UnionType):
        args = [a for a in get_args(ann) if a is not NoneType]
        if len(args) == 1 and len(get_args(ann)) == 2:
            return args[0], True
    return ann, False


def spec_defaults(base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, info in RunSpec.model_fields.items():
        if base is not None and name in base:
            values[name] = base[name]
        elif not info.is_required():
            values[name] = info.get_default(call_default_factory=True)
        else:
            values[name] = ""
    return {k: form_value(v) for k, v in values.items()}


def form_value(v: Any) -> Any:
    """A stored value as its input shows it."""
    if isinstance(v, bool):
        return v
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else str(v)


def parse_fields(form: FormData, fields: list[FormField]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values to show again by input name, model input by field) from a submitted form."""
    shown: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for f in fields:
        raw = form.get(f.name)
        text = raw.strip() if isinstance(raw, str) else ""
        if f.kind == "checkbox":
            # An unchecked box sends nothing; the form always has every field, so absent = off.
            shown[f.name] = data[f.field] = text in ("on", "true", "1")
        elif f.kind == "list":
            shown[f.name], data[f.field] = text, split_list(text)
        elif not text and (f.required or f.nullable):
            # Left out: "is required" for a required field, None (the default) for a nullable.
            shown[f.name] = ""
        else:
            # Passed on as typed: an emptied number is an error to show, not a default.
            shown[f.name] = data[f.field] = text
    return shown, data


def _parse_form(form: FormData) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(values to show again, spec input, run fields) from a submitted form."""
    shown, spec_in = parse_fields(form, [f for _, fields in spec_fields() for f in fields])
    run_fields = {k: str(form.get(k) or "").strip() for k in ("name", "tags", "notes")}
    shown.update(run_fields)
    return shown, spec_in, run_fields


def field_errors(errors: list[dict[str, str]], nested: tuple[str, ...] = ()) -> dict[str, str]:
    """The first message for each input. A field inside one of `nested` keeps its prefix
    ("body.gates.min_accuracy" is the input "gates.min_accuracy")."""
    out: dict[str, str] = {}
    for err in errors:
        # "body.spec.gpu_type" (from the service) and "spec.gpu_type" both mean the gpu_type field.
        parts = err["field"].split(".")
        while len(parts) > 1 and parts[0] in ("body", "spec"):
            parts = parts[1:]
        key = ".".join(parts[:2]) if parts[0] in nested and len(parts) > 1 else parts[0]
        out.setdefault(key, err["message"])
    return out


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
    source = q.get_run(session, source_id) if source_id else None
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
