"""What one run's page shows, built from its `RunDetail`: the timeline in words, the phase
strip, the per-class table, sample predictions, where its log is, its quality gate's checks,
whether it can be promoted, and its artifacts with download links. No routes here: the page,
its live fragments (`run_page`) and a failed action's re-render
(`run_actions`) all draw from `run_context` (the full page from `page_context`)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlmodel import Session

from api.config import Settings
from api.db import utcnow
from api.runs import detail as detail_q
from api.runs.artifacts import FILE_KINDS, run_artifacts
from api.runs.models import Run
from api.runs.states import ACTIVE, TERMINAL, RunStatus
from api.web import charts
from api.web.format import pct
from trainer.contract.spec import RunSpec

PHASE_EVENTS = {"phase"}
END_EVENTS = {"completed", "failed", "segment_done"}
CLASS_SORTS = {"label", "precision", "recall", "f1", "baseline_f1", "change", "support"}
# The checks of api/templates/gates.py, as a person reads them; an unknown name is shown as it is.
GATE_CHECKS = {
    "min_accuracy": "Minimum accuracy",
    "min_macro_f1": "Minimum macro F1",
    "max_unknown_rate": "Maximum unknown-answer rate",
    "no_worse_than_champion": "No worse than the champion (McNemar)",
    "max_class_f1_drop": "Per-class F1 drop against the champion",
    "final_evaluation": "Final evaluation",
    "gates": "Gates",
    "template": "Template",
    "run": "Run",
}
OUTCOME_ICONS = {"passed": "✓", "failed": "✕", "not_applicable": "—"}


def _phase_spans(detail: detail_q.RunDetail) -> list[charts.Span]:
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
        name = str(g("phase")).replace("_", " ")
        return f"{name}: {g('detail')}" if g("detail") else name
    if etype == "evaluation":
        return (
            f"{g('stage')}: accuracy {pct(g('accuracy'))}, macro F1 {pct(g('macro_f1'))}, "
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


def _class_rows(detail: detail_q.RunDetail, sort: str, desc: bool) -> list[dict[str, Any]]:
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
    detail: detail_q.RunDetail, limit_wrong: int = 12, limit_right: int = 6
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


def _gate_checks(run: Run) -> list[dict[str, Any]]:
    """The gate's checks as recorded on the run (api/templates/gates.py `Check.as_dict`): name,
    outcome, the reason in words (with the McNemar p-value, the largest class drops...), and the
    figures worth a table or a link. Defensive about shape: the column is free-form JSON."""
    out = []
    for raw in run.gate_reasons or []:
        if not isinstance(raw, Mapping):
            continue
        check = str(raw.get("check", "?"))
        outcome = str(raw.get("outcome", ""))
        champion = raw.get("champion_run_id")
        out.append(
            {
                "name": GATE_CHECKS.get(check, check.replace("_", " ")),
                "outcome": outcome,
                "icon": OUTCOME_ICONS.get(outcome, "•"),
                "reason": str(raw.get("reason", "")),
                "champion": champion if isinstance(champion, str) and champion else None,
                "drops": _drops(raw.get("drops")),
            }
        )
    return out


def _drops(raw: Any) -> list[dict[str, Any]]:
    """The per-class rows of a `max_class_f1_drop` check that lost F1 (the others, up to 20
    recorded, would be noise), worst first as recorded."""
    rows = []
    for d in raw if isinstance(raw, list) else []:
        if not isinstance(d, Mapping):
            continue
        old, new = d.get("champion_f1"), d.get("f1")
        if not isinstance(old, int | float) or not isinstance(new, int | float) or old <= new:
            continue
        rows.append({"label": str(d.get("label", "")), "champion_f1": old, "f1": new})
    return rows


def artifact_links(session: Session, run: Run, settings: Settings) -> list[dict[str, Any]]:
    """The run's artifacts as `GET /api/v1/runs/{id}/artifacts` lists them (the same function,
    so the page and the API never disagree): each with its signed download URL where the api's
    credentials can sign one, else just its URI (directories, local paths, no signing key)."""
    links = []
    for a in run_artifacts(session, settings, run.id).artifacts:
        url = a.download_url
        # Made by the storage client from its endpoint, so http(s) already; checked anyway
        # because it becomes an href.
        if url is not None and not url.lower().startswith(("https://", "http://")):
            url = None
        links.append({"kind": a.kind, "uri": a.uri, "url": url})
    return links


def page_context(
    request: Request, session: Session, detail: detail_q.RunDetail, settings: Settings
) -> dict[str, Any]:
    """Everything the whole run page shows: `run_context` plus what only the full page (not its
    live fragments) holds, the artifact links, whose signing may cost a call to Google."""
    artifacts = artifact_links(session, detail.run, settings)
    return {
        **run_context(request, detail, settings),
        "artifacts": artifacts,
        "signed_url_minutes": settings.signed_url_minutes,
        # A file in Cloud Storage that got no link: the credentials cannot sign (say so once).
        "artifacts_unsigned": any(
            a["url"] is None and a["kind"] in FILE_KINDS and a["uri"].startswith("gs://")
            for a in artifacts
        ),
    }


def run_context(request: Request, detail: detail_q.RunDetail, settings: Settings) -> dict[str, Any]:
    run = detail.run
    p = request.query_params
    sort = p.get("sort") or "f1"
    if sort not in CLASS_SORTS:
        sort = "f1"
    desc = p.get("dir") == "desc"  # ascending F1 by default: the worst classes first
    final = detail.evaluations.get("final")
    baseline = detail.evaluations.get("baseline")
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
        **_charts(detail),
        "final": final,
        "baseline": baseline,
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
        "champion_of": detail.champion_of,
        # Shown for template runs; a plain run's "not applicable (no template)" says nothing.
        "gate_checks": _gate_checks(run)
        if run.gate_status in ("passed", "failed") or run.template_name
        else [],
        # What api/templates/champions.promote accepts: a succeeded run of a template. A run
        # whose gate failed is offered "promote anyway" with a note (force), not the plain button.
        "can_promote": run.status == RunStatus.succeeded
        and run.template_name is not None
        and detail.champion_of is None,
    }


def _charts(detail: detail_q.RunDetail) -> dict[str, Any]:
    """The run page's charts and timeline: loss, phases, the events, the confusion matrix of the
    final evaluation (else the baseline's)."""
    run = detail.run
    shown_eval = detail.evaluations.get("final") or detail.evaluations.get("baseline")
    return {
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
        "confusion": charts.confusion_heatmap(shown_eval.labels, shown_eval.confusion_matrix)
        if shown_eval
        else None,
        "confusion_stage": shown_eval.stage if shown_eval else None,
    }
