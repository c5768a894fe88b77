"""What a run measured, as the REST API and the dashboard read it: the training series, the
baseline and final evaluations with their per-class metrics, and where the trainer is now."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlmodel import Session, col, select

from api.errors import Problem
from api.events.models import ClassMetric, Evaluation, ProgressPoint, RunEvent
from api.runs.models import Run
from api.runs.states import RunStatus


class ProgressPointOut(BaseModel):
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    learning_rate: float | None
    samples_per_second: float | None
    gpu_memory_gb: float | None
    segment: int
    time: datetime


class ClassMetricOut(BaseModel):
    label: str
    precision: float
    recall: float
    f1: float
    support: int


class EvaluationOut(BaseModel):
    stage: str
    accuracy: float
    macro_f1: float
    unknown_rate: float
    num_samples: int
    samples_per_second: float | None
    seconds: float | None
    labels: list[str]
    confusion_matrix: list[list[int]] = Field(
        description="rows: true label; columns: predicted label, then one for 'no label found'"
    )
    per_class: list[ClassMetricOut]
    predictions: list[dict[str, Any]] | None = Field(
        None, description="every sample's outcome; only with `predictions=true`"
    )


class RunMetrics(BaseModel):
    run_id: str
    status: RunStatus
    phase: str | None = Field(description="the trainer's latest phase, from its events")
    segment: int
    last_step: int
    total_steps: int | None
    progress: list[ProgressPointOut] = Field(description="training steps, in step order")
    baseline: EvaluationOut | None
    final: EvaluationOut | None


def run_metrics(
    session: Session, run_id: str, *, since_step: int = -1, predictions: bool = False
) -> RunMetrics:
    """The run's metrics; `since_step` leaves out the steps a poller already has."""
    run = session.get(Run, run_id)
    if run is None:
        raise Problem(404, "Run not found", f"there is no run with id {run_id!r}")
    points = session.exec(
        select(ProgressPoint)
        .where(ProgressPoint.run_id == run_id, ProgressPoint.step > since_step)
        .order_by(col(ProgressPoint.step))
    ).all()
    phase = session.exec(
        select(RunEvent.data)
        .where(RunEvent.run_id == run_id, RunEvent.type == "phase")
        .order_by(col(RunEvent.seq).desc(), col(RunEvent.received_at).desc())
        .limit(1)
    ).first()
    evaluations = {
        e.stage: e
        for e in session.exec(select(Evaluation).where(Evaluation.run_id == run_id)).all()
    }
    classes: dict[str, list[ClassMetricOut]] = {}
    for c in session.exec(
        select(ClassMetric).where(ClassMetric.run_id == run_id).order_by(col(ClassMetric.label))
    ).all():
        classes.setdefault(c.stage, []).append(ClassMetricOut.model_validate(c.model_dump()))

    def _evaluation(stage: str) -> EvaluationOut | None:
        row = evaluations.get(stage)
        if row is None:
            return None
        values = row.model_dump(exclude={"run_id", "created_at", "predictions"})
        return EvaluationOut(
            **values,
            per_class=classes.get(stage, []),
            predictions=row.predictions if predictions else None,
        )

    return RunMetrics(
        run_id=run.id,
        status=RunStatus(run.status),
        phase=phase.get("phase") if isinstance(phase, dict) else None,
        segment=run.segment,
        last_step=run.last_step,
        total_steps=run.total_steps,
        progress=[ProgressPointOut.model_validate(p.model_dump()) for p in points],
        baseline=_evaluation("baseline"),
        final=_evaluation("final"),
    )
