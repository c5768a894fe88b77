"""One run as its dashboard page shows it, and a few runs side by side."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from api.events.models import ClassMetric, Evaluation, ProgressPoint, RunEvent
from api.runs.models import Run
from api.runs.query import tags_of
from api.templates.champions import champions_among

TIMELINE_EVENTS = 300


@dataclass
class RunDetail:
    run: Run
    tags: list[str]
    events: list[RunEvent]
    loss: list[tuple[int, float]]
    evaluations: dict[str, Evaluation]
    class_metrics: dict[str, list[ClassMetric]]
    parent: Run | None
    children: list[Run]
    champion_of: str | None = None  # the template whose current champion this run is

    @property
    def latest_progress(self) -> tuple[int, float] | None:
        return self.loss[-1] if self.loss else None


def get_run(session: Session, run_id: str) -> Run | None:
    return session.get(Run, run_id)


def run_detail(session: Session, run_id: str) -> RunDetail | None:
    run = session.get(Run, run_id)
    if run is None:
        return None
    # Progress events become ProgressPoints; the timeline shows the events that change state.
    events = list(
        session.exec(
            select(RunEvent)
            .where(col(RunEvent.run_id) == run_id, col(RunEvent.type) != "progress")
            .order_by(col(RunEvent.time), col(RunEvent.segment), col(RunEvent.seq))
            .limit(TIMELINE_EVENTS)
        ).all()
    )
    loss = [
        (step, loss)
        for step, loss in session.exec(
            select(ProgressPoint.step, ProgressPoint.loss)
            .where(col(ProgressPoint.run_id) == run_id, col(ProgressPoint.loss).is_not(None))
            .order_by(col(ProgressPoint.step))
        )
        if loss is not None
    ]
    evaluations = {
        e.stage: e
        for e in session.exec(select(Evaluation).where(col(Evaluation.run_id) == run_id)).all()
    }
    metrics: dict[str, list[ClassMetric]] = defaultdict(list)
    for m in session.exec(select(ClassMetric).where(col(ClassMetric.run_id) == run_id)).all():
        metrics[m.stage].append(m)
    parent = session.get(Run, run.parent_id) if run.parent_id else None
    children = list(
        session.exec(
            select(Run).where(col(Run.parent_id) == run_id).order_by(col(Run.created_at)).limit(20)
        ).all()
    )
    return RunDetail(
        run=run,
        tags=tags_of(session, [run_id]).get(run_id, []),
        events=events,
        loss=loss,
        evaluations=evaluations,
        class_metrics=dict(metrics),
        parent=parent,
        children=children,
        champion_of=champions_among(session, [run_id]).get(run_id) if run.template_name else None,
    )


# ---- compare ----------------------------------------------------------------------------------


@dataclass
class Comparison:
    runs: list[Run]
    spec_rows: list[tuple[str, list[Any], bool]]  # (field, value per run, differs)
    class_rows: list[tuple[str, list[float | None]]]  # (label, final F1 per run)


def compare(session: Session, run_ids: list[str]) -> tuple[Comparison | None, list[str]]:
    """The runs in the order asked for; the second value lists ids that do not exist."""
    found = {r.id: r for r in session.exec(select(Run).where(col(Run.id).in_(run_ids))).all()}
    missing = [i for i in run_ids if i not in found]
    if missing:
        return None, missing
    runs = [found[i] for i in run_ids]
    names: list[str] = []
    for r in runs:
        names += [k for k in r.spec if k not in names]
    spec_rows = []
    for name in names:
        values = [r.spec.get(name) for r in runs]
        spec_rows.append((name, values, any(v != values[0] for v in values)))
    f1: dict[str, dict[str, float]] = defaultdict(dict)
    for m in session.exec(
        select(ClassMetric).where(
            col(ClassMetric.run_id).in_(run_ids), col(ClassMetric.stage) == "final"
        )
    ).all():
        f1[m.label][m.run_id] = m.f1
    class_rows = [(label, [per_run.get(i) for i in run_ids]) for label, per_run in f1.items()]
    return Comparison(runs, spec_rows, class_rows), []
