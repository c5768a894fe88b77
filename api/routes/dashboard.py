"""The dashboard: server-rendered HTML pages over the same tables and services as the REST API.

Every page works with JavaScript off; `static/dashboard.js` only adds live updates of an active
run (polling `/runs/{id}/live`) and client-side table sorting. Reads come from
`api.services.dashboard`; writes (new run, cancel, retrain) go through `api.services.runs`, the
functions behind `/api/v1/runs`, so both doors apply the same rules. Forms carry a CSRF token
(`api/csrf.py`); templates are autoescaped and charts escape their own text (`api/charts.py`).
"""

from __future__ import annotations

import math
import re
import secrets
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from pydantic import ValidationError
from sqlmodel import Session
from starlette.datastructures import FormData

from api import charts, csrf
from api.config import Settings
from api.deps import SessionDep, SettingsDep
from api.errors import Problem
from api.models import RetrainRequest, Run, RunCreate
from api.models.types import utcnow
from api.services import dashboard as q
from api.services import runs as runs_service
from api.states import ACTIVE, TERMINAL, RunStatus
from trainer.spec import RunSpec, describe_errors, field_bounds

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
STATIC = Path(__file__).resolve().parents[1] / "static"
# api/main.py includes this router behind `api.auth.dashboard_access` (a login with auth on).
router = APIRouter(include_in_schema=False)


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

STATUS_ICONS = {
    "queued": "◷",
    "dispatched": "↗",
    "running": "▶",
    "cancelling": "◌",
    "succeeded": "✓",
    "failed": "✕",
    "cancelled": "⊘",
}
FORM_KEY = "form_key"
NOTICES = {
    "created": "Run created. It is queued and starts when a GPU is free.",
    "cancel-requested": "Cancel requested.",
    "retrained": "Retrain started from the earlier run's spec.",
}


# ---- formatting (Jinja filters) ---------------------------------------------------------------


def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v * 100:.{digits}f}%"


def _pp(base: float | None, final: float | None) -> str:
    if base is None or final is None:
        return ""
    return f"{(final - base) * 100:+.1f} pp"


def _change_class(base: float | None, final: float | None) -> str:
    if base is None or final is None:
        return ""
    d = final - base
    return "up" if d > 0.0005 else "down" if d < -0.0005 else "flat"


def _secs(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _ago(when: datetime | None) -> str:
    if when is None:
        return "—"
    s = (utcnow() - when).total_seconds()
    if s < 45:
        return "just now"
    if s < 3600:
        return f"{round(s / 60)} min ago"
    if s < 86400:
        return f"{round(s / 3600)} h ago"
    if s < 86400 * 60:
        return f"{round(s / 86400)} d ago"
    return when.strftime("%Y-%m-%d")


def _when(when: datetime | None) -> str:
    return "—" if when is None else when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(run: Run) -> str:
    if run.started_at is None:
        return "—"
    end = run.finished_at or (utcnow() if run.status in ACTIVE else run.updated_at)
    return _secs((end - run.started_at).total_seconds())


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "—" if v is None else ("yes" if v else "no")
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def _qs(args: Mapping[str, Any], **changes: Any) -> str:
    merged = {k: v for k, v in {**args, **changes}.items() if v not in (None, "")}
    return "?" + urllib.parse.urlencode(merged) if merged else ""


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "svg"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        pct=_pct, pp=_pp, change=_change_class, ago=_ago, when=_when, secs=_secs,
        duration=_duration, num=_num,
    )  # fmt: skip
    env.globals.update(
        STATUS_ICONS=STATUS_ICONS,
        ACTIVE=ACTIVE,
        TERMINAL=TERMINAL,
        qs=_qs,
        statuses=list(RunStatus),
    )
    return env


ENV = _env()


# ---- rendering --------------------------------------------------------------------------------


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("notice", NOTICES.get(request.query_params.get("notice", "")))
    context.setdefault("page_error", None)
    html = ENV.get_template(template).render(
        request_path=request.url.path,
        csrf_field=csrf.FIELD,
        csrf_token=csrf.token(request, _settings(request)),
        form_key_field=FORM_KEY,
        form_key=secrets.token_urlsafe(18),
        **context,
    )
    response = HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
    csrf.set_cookie(request, response)
    return response


def error_page(request: Request, status_code: int, title: str, detail: str) -> HTMLResponse:
    return render(request, "error.html", status_code, title=title, detail=detail)


def _not_found(request: Request, run_id: str) -> HTMLResponse:
    return error_page(request, 404, "Run not found", f"There is no run with the id {run_id!r}.")


async def _checked_form(request: Request) -> FormData | HTMLResponse:
    """The POSTed form, or the 403 page when its CSRF token is not valid."""
    form = await request.form()
    try:
        csrf.verify(request, _settings(request), form.get(csrf.FIELD))
    except csrf.CsrfError as exc:
        return error_page(request, 403, "Form expired or forged", str(exc))
    return form


def _form_key(form: FormData) -> str | None:
    """The idempotency key a form was rendered with: a double-clicked submit (or a reload of the
    POST) makes one run, not two. Each page view renders a new key (pages are never cached)."""
    key = form.get(FORM_KEY)
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]{16,64}", key):
        return "dashboard:" + key
    return None


# ---- runs list --------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, session: SessionDep) -> HTMLResponse:
    p = request.query_params
    try:
        filters = q.RunFilters.parse(
            p.get("status"), p.get("model"), p.get("tag"), p.get("q"), p.get("dataset")
        )
        limit = _int_param(p.get("limit"), q.PAGE_SIZE, 1, q.MAX_PAGE_SIZE, "limit")
        page = q.list_runs(
            session, filters, after=p.get("after"), before=p.get("before"), limit=limit
        )
    except q.BadQuery as exc:
        return error_page(request, 400, "Cannot list runs", str(exc))
    args = filters.query_args()
    if limit != q.PAGE_SIZE:
        args["limit"] = str(limit)
    return render(request, "runs.html", page=page, filters=filters, args=args)


def _int_param(raw: str | None, default: int, lo: int, hi: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise q.BadQuery(f"{name} must be a whole number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise q.BadQuery(f"{name} must be between {lo} and {hi}, got {value}")
    return value


# ---- history ----------------------------------------------------------------------------------


@router.get("/history", response_class=HTMLResponse)
def history_page(request: Request, session: SessionDep) -> HTMLResponse:
    model = request.query_params.get("model") or None
    dataset = request.query_params.get("dataset") or None
    hist = q.history(session, model=model, dataset=dataset)
    groups = []
    for g in hist.groups:
        acc = [
            charts.HistoryPoint(r.id, r.label, r.at, r.baseline_accuracy, r.final_accuracy)
            for r in g.runs
        ]
        f1 = [
            charts.HistoryPoint(r.id, r.label, r.at, r.baseline_macro_f1, r.final_macro_f1)
            for r in g.runs
            if r.final_macro_f1 is not None
        ]
        groups.append(
            {
                "group": g,
                "accuracy_chart": charts.history_chart(acc, metric="accuracy"),
                "f1_chart": charts.history_chart(f1, metric="macro F1"),
            }
        )
    return render(
        request, "history.html", groups=groups, more=hist.more_groups, model=model, dataset=dataset
    )


# ---- new run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormField:
    name: str
    label: str
    kind: Literal["text", "number", "checkbox", "select", "list"]
    required: bool
    help: str
    lo: float | None = None
    hi: float | None = None
    step: str = "1"
    options: tuple[str, ...] = ()


FIELD_GROUPS: list[tuple[str, list[str]]] = [
    ("Model and data", ["model_id", "dataset", "train_size", "eval_size"]),
    ("Training", ["num_epochs", "learning_rate", "batch_size", "gradient_accumulation_steps",
                  "max_length", "gradient_checkpointing", "save_steps", "seed"]),
    ("LoRA", ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_vision"]),
    ("Evaluation", ["eval_batch_size", "max_new_tokens"]),
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
        out.append((title, [_form_field(n) for n in names]))
    return out


def _form_field(name: str) -> FormField:
    info = RunSpec.model_fields[name]
    ann = info.annotation
    label = LABELS.get(name, name.replace("_", " ").capitalize())
    common: dict[str, Any] = {
        "name": name,
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
        lo, hi = field_bounds(name)
        return FormField(kind="number", lo=lo, hi=hi, step="1" if ann is int else "any", **common)
    return FormField(kind="text", **common)


def _spec_defaults(base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, info in RunSpec.model_fields.items():
        if base is not None and name in base:
            values[name] = base[name]
        elif not info.is_required():
            values[name] = info.get_default(call_default_factory=True)
        else:
            values[name] = ""
    return {k: _form_value(v) for k, v in values.items()}


def _form_value(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else str(v)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_form(form: FormData) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(values to show again, spec input, run fields) from a submitted form."""
    shown: dict[str, Any] = {}
    spec_in: dict[str, Any] = {}
    for _title, fields in spec_fields():
        for f in fields:
            raw = form.get(f.name)
            text = raw.strip() if isinstance(raw, str) else ""
            if f.kind == "checkbox":
                # An unchecked box sends nothing; the form always has every field, so absent = off.
                shown[f.name] = spec_in[f.name] = text in ("on", "true", "1")
            elif f.kind == "list":
                shown[f.name], spec_in[f.name] = text, _split(text)
            elif f.required and not text:
                shown[f.name] = ""  # left out, so the error says "is required"
            else:
                # Passed on as typed: an emptied number is an error to show, not a default.
                shown[f.name] = spec_in[f.name] = text
    run_fields = {k: str(form.get(k) or "").strip() for k in ("name", "tags", "notes")}
    shown.update(run_fields)
    return shown, spec_in, run_fields


def _field_errors(errors: list[dict[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for err in errors:
        # "body.spec.gpu_type" (from the service) and "spec.gpu_type" both mean the gpu_type field.
        parts = err["field"].split(".")
        while len(parts) > 1 and parts[0] in ("body", "spec"):
            parts = parts[1:]
        key = parts[0]
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
        return _not_found(request, source_id)
    values = _spec_defaults(source.spec if source else None)
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
    form = await _checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    shown, spec_in, run_fields = _parse_form(form)
    errors: dict[str, str] = {}
    spec: RunSpec | None = None
    try:
        spec = RunSpec.model_validate(spec_in)
    except ValidationError as exc:
        errors.update(_field_errors(describe_errors(exc)))
    body: RunCreate | None = None
    try:
        body = RunCreate.model_validate(
            {
                "spec": spec or _spec_defaults(),  # checks name/tags/notes even if the spec fails
                "name": run_fields["name"],
                "tags": _split(run_fields["tags"]),
                "notes": run_fields["notes"],
            }
        )
    except ValidationError as exc:
        for key, message in _field_errors(describe_errors(exc)).items():
            if key in ("name", "tags", "notes"):
                errors.setdefault(key, message)
    if errors or body is None or spec is None:
        return _new_form(
            request, shown, errors, 422, page_error="Fix the fields marked below and submit again."
        )
    try:
        created = runs_service.create_run(session, settings, body, idempotency_key=_form_key(form))
    except Problem as exc:
        extra = exc.extra.get("errors")
        if isinstance(extra, list):
            errors.update(_field_errors([e for e in extra if isinstance(e, dict)]))
        return _new_form(
            request,
            shown,
            errors,
            exc.status,
            page_error=f"{exc.title}: {exc.detail or ''}".rstrip(": "),
        )
    return RedirectResponse(f"/runs/{created.run.id}?notice=created", status_code=303)


# ---- one run ----------------------------------------------------------------------------------


PHASE_EVENTS = {"phase"}
END_EVENTS = {"completed", "failed", "segment_done"}
CLASS_SORTS = {"label", "precision", "recall", "f1", "baseline_f1", "change", "support"}


def _phase_spans(detail: q.RunDetail) -> list[charts.Span]:
    spans: list[charts.Span] = []
    marks = [e for e in detail.events if e.type in PHASE_EVENTS | END_EVENTS | {"started"}]
    for i, e in enumerate(marks):
        if e.type != "phase":
            continue
        end = marks[i + 1].time if i + 1 < len(marks) else None
        if end is None:
            end = detail.run.finished_at or (utcnow() if detail.run.status in ACTIVE else e.time)
        spans.append(charts.Span(str(e.data.get("phase", "?")), e.time, max(end, e.time)))
    return spans


def _event_summary(etype: str, data: Mapping[str, Any]) -> str:
    def g(key: str) -> Any:
        return data.get(key)

    if etype == "started":
        bits = [f"segment {g('segment') or 0}", f"attempt {g('attempt') or 0}"]
        if g("device"):
            bits.append(f"on {g('device')}")
        if g("host"):
            bits.append(f"host {g('host')}")
        if g("resumed_from_step") is not None:
            bits.append(f"resumed from step {g('resumed_from_step')}")
        return ", ".join(bits)
    if etype == "phase":
        return str(g("phase")).replace("_", " ")
    if etype == "evaluation":
        return (
            f"{g('stage')}: accuracy {_pct(g('accuracy'))}, macro F1 {_pct(g('macro_f1'))}, "
            f"{g('num_samples')} samples"
        )
    if etype == "checkpoint":
        return f"step {g('step')} → {g('uri')}"
    if etype == "artifact":
        return f"{g('kind')}: {g('uri')}"
    if etype == "segment_done":
        return f"segment ended at step {g('step')}; resumes from {g('checkpoint_uri')}"
    if etype == "completed":
        return f"finished at step {g('step')}" + (
            f"; results {g('results_uri')}" if g("results_uri") else ""
        )
    if etype == "failed":
        return str(g("error"))
    return ", ".join(f"{k}={v}" for k, v in data.items())[:300]


def _outcome_note(outcome: str) -> str | None:
    """What the timeline says about an event's outcome: nothing when it simply took effect,
    the reason when it was stored but changed nothing (late, duplicate, another segment)."""
    if not outcome or outcome == "recorded" or outcome.startswith("applied"):
        return None
    return outcome


def _class_rows(detail: q.RunDetail, sort: str, desc: bool) -> list[dict[str, Any]]:
    final = detail.class_metrics.get("final") or []
    baseline = {m.label: m for m in detail.class_metrics.get("baseline") or []}
    source = final or list(baseline.values())
    rows = []
    for m in source:
        b = baseline.get(m.label) if final else None
        rows.append(
            {
                "label": m.label,
                "precision": m.precision,
                "recall": m.recall,
                "f1": m.f1,
                "support": m.support,
                "baseline_f1": b.f1 if b else None,
                "change": (m.f1 - b.f1) if b else None,
            }
        )

    # Missing values (a class without a baseline) go last whichever way the column is sorted.
    present = [r for r in rows if r[sort] is not None]
    absent = [r for r in rows if r[sort] is None]
    if sort == "label":
        present.sort(key=lambda r: str(r["label"]).lower(), reverse=desc)
    else:
        present.sort(key=lambda r: (r[sort], str(r["label"]).lower()), reverse=desc)
    return present + absent


def _predictions(
    detail: q.RunDetail, limit_wrong: int = 12, limit_right: int = 6
) -> tuple[str, list[dict[str, Any]]]:
    ev = detail.evaluations.get("final") or detail.evaluations.get("baseline")
    if ev is None:
        return "", []
    wrong = [p for p in ev.predictions if not p.get("correct")][:limit_wrong]
    right = [p for p in ev.predictions if p.get("correct")][:limit_right]
    return ev.stage, wrong + right


def _log_link(run: Run, settings: Settings) -> tuple[str | None, str | None]:
    """(href, note) for the run's log: our own route for a local file under the data directory,
    the URL itself for http(s) (a console link), otherwise no link, just the location."""
    uri = run.log_uri
    if not uri:
        return None, None
    if local_log_path(run, settings) is not None:
        return f"/runs/{run.id}/log", "local file"
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        return uri, "external"
    return None, None


def local_log_path(run: Run, settings: Settings) -> Path | None:
    """The run's log file when `log_uri` names a file inside the data directory; else None.
    Anything outside it (a path that climbs out, a link pointing elsewhere) is never served."""
    uri = run.log_uri
    if not uri:
        return None
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file":
        raw = urllib.parse.unquote(parts.path)
    elif parts.scheme and len(parts.scheme) > 1:  # a one-letter "scheme" is a Windows drive
        return None
    else:
        raw = uri
    try:
        path = Path(raw).expanduser().resolve()
        root = settings.data_dir.expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def _run_context(request: Request, detail: q.RunDetail, settings: Settings) -> dict[str, Any]:
    run = detail.run
    p = request.query_params
    sort = p.get("sort") or "f1"
    if sort not in CLASS_SORTS:
        sort = "f1"
    desc = p.get("dir") == "desc"  # ascending F1 by default: the worst classes first
    final = detail.evaluations.get("final")
    baseline = detail.evaluations.get("baseline")
    shown_eval = final or baseline
    stage, predictions = _predictions(detail)
    log_href, log_note = _log_link(run, settings)
    progress = None
    if run.total_steps:
        progress = min(run.last_step / run.total_steps, 1.0)
    return {
        "d": detail,
        "run": run,
        "spec_items": [(k, run.spec.get(k)) for k in RunSpec.model_fields if k in run.spec]
        + [(k, v) for k, v in run.spec.items() if k not in RunSpec.model_fields],
        "loss_chart": charts.loss_chart(
            detail.loss,
            total_steps=run.total_steps,
            empty="No training steps were reported"
            if run.status in TERMINAL
            else "No loss reported yet",
        ),
        "phase_chart": charts.phase_strip(_phase_spans(detail)),
        "timeline": [
            {
                "event": e,
                "summary": _event_summary(e.type, e.data),
                "note": _outcome_note(e.outcome),
            }
            for e in detail.events
        ],
        "final": final,
        "baseline": baseline,
        "confusion": charts.confusion_heatmap(shown_eval.labels, shown_eval.confusion_matrix)
        if shown_eval
        else None,
        "confusion_stage": shown_eval.stage if shown_eval else None,
        "class_rows": _class_rows(detail, sort, desc),
        "class_stage": "final" if detail.class_metrics.get("final") else "baseline",
        "sort": sort,
        "desc": desc,
        "pred_stage": stage,
        "predictions": predictions,
        "log_href": log_href,
        "log_note": log_note,
        "progress": progress,
        "active": run.status in ACTIVE or run.status == RunStatus.queued,
        "can_cancel": run.status not in TERMINAL and run.status != RunStatus.cancelling,
        "tags": detail.tags,
    }


LIVE_PARTS = {
    "header": "_run_header.html",
    "progress": "_run_progress.html",
    "timeline": "_run_timeline.html",
    "results": "_run_results.html",
}


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(
    request: Request, run_id: str, session: SessionDep, settings: SettingsDep
) -> HTMLResponse:
    detail = q.run_detail(session, run_id)
    if detail is None:
        return _not_found(request, run_id)
    return render(request, "run.html", **_run_context(request, detail, settings))


@router.get("/runs/{run_id}/live")
def run_live(request: Request, run_id: str, session: SessionDep, settings: SettingsDep) -> Response:
    """What changes on an active run's page, as server-rendered (escaped) fragments: the page's
    script swaps them in place. `active: false` tells it to stop polling."""
    detail = q.run_detail(session, run_id)
    if detail is None:
        return JSONResponse({"error": "run not found"}, status_code=404)
    ctx = _run_context(request, detail, settings)
    ctx.update(
        csrf_field=csrf.FIELD,
        csrf_token=csrf.token(request, settings),
        form_key_field=FORM_KEY,
        form_key=secrets.token_urlsafe(18),
        request_path=f"/runs/{run_id}",
        notice=None,
        page_error=None,
    )
    html = {key: ENV.get_template(name).render(**ctx) for key, name in LIVE_PARTS.items()}
    body = {
        "status": detail.run.status,
        "active": ctx["active"],
        "last_step": detail.run.last_step,
        "total_steps": detail.run.total_steps,
        "html": html,
    }
    response = JSONResponse(body, headers={"Cache-Control": "no-store"})
    csrf.set_cookie(request, response)
    return response


@router.get("/runs/{run_id}/log")
def run_log(request: Request, run_id: str, session: SessionDep, settings: SettingsDep) -> Response:
    run = q.get_run(session, run_id)
    if run is None:
        return _not_found(request, run_id)
    path = local_log_path(run, settings)
    if path is None:
        return error_page(
            request,
            404,
            "No local log",
            "This run's log is not a file in the api's data directory"
            + (f"; it is at {run.log_uri}" if run.log_uri else "; no log has been recorded yet")
            + ".",
        )
    # Plain text, never sniffed: a log full of model output must not render as a page.
    return FileResponse(
        path,
        media_type="text/plain; charset=utf-8",
        headers={
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'",
        },
        content_disposition_type="inline",
        filename=f"{run_id}.log",
    )


@router.post("/runs/{run_id}/cancel", response_class=HTMLResponse)
async def cancel_run_form(
    request: Request, run_id: str, session: SessionDep, settings: SettingsDep
) -> Response:
    form = await _checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    if q.get_run(session, run_id) is None:
        return _not_found(request, run_id)
    try:
        runs_service.cancel_run(session, settings, run_id, reason="cancelled from the dashboard")
    except Problem as exc:
        return _run_with_error(request, session, settings, run_id, exc)
    return RedirectResponse(f"/runs/{run_id}?notice=cancel-requested", status_code=303)


@router.post("/runs/{run_id}/retrain", response_class=HTMLResponse)
async def retrain_run_form(
    request: Request, run_id: str, session: SessionDep, settings: SettingsDep
) -> Response:
    form = await _checked_form(request)
    if isinstance(form, HTMLResponse):
        return form
    if q.get_run(session, run_id) is None:
        return _not_found(request, run_id)
    try:
        new = runs_service.retrain_run(
            session, settings, run_id, RetrainRequest(), idempotency_key=_form_key(form)
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
        return _not_found(request, run_id)
    message = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
    return render(
        request,
        "run.html",
        exc.status,
        page_error=message,
        **_run_context(request, detail, settings),
    )


# ---- compare ----------------------------------------------------------------------------------

MAX_COMPARE = 8


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request, session: SessionDep) -> HTMLResponse:
    ids: list[str] = []
    for raw in request.query_params.getlist("ids"):
        ids += [i for i in _split(raw) if i not in ids]
    if len(ids) < 2 or len(ids) > MAX_COMPARE:
        message = (
            f"Pick between 2 and {MAX_COMPARE} runs to compare (got {len(ids)}): tick them on the "
            "runs page, or list their ids below."
        )
        status = 200 if not ids else 400
        return render(
            request, "compare.html", status, cmp=None, ids=ids, page_error=message if ids else None
        )
    cmp, missing = q.compare(session, ids)
    if cmp is None:
        return render(
            request,
            "compare.html",
            404,
            cmp=None,
            ids=ids,
            page_error=f"No run with the id {', '.join(repr(m) for m in missing)}.",
        )
    rows = []
    for label, values in cmp.class_rows:
        ref = values[0]
        changes = [None if v is None or ref is None else v - ref for v in values]
        worst = min((c for c in changes[1:] if c is not None), default=None)
        rows.append({"label": label, "values": values, "changes": changes, "worst": worst})
    # Biggest drop first: a regression in one class is what a comparison is usually for.
    rows.sort(
        key=lambda r: (r["worst"] is None, r["worst"] if r["worst"] is not None else 0, r["label"])
    )
    differing = [r for r in cmp.spec_rows if r[2]]
    return render(request, "compare.html", cmp=cmp, ids=ids, class_rows=rows, differing=differing)
