"""Runs and events for the callback and worker tests, built on the real models."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from api.auth.callback import mint_token
from api.config import Settings
from api.db import session_scope
from api.runs.models import Run

# The runs themselves come from the api package, which the ingest bench shares.
from api.runs.seed import SPEC as SPEC
from api.runs.seed import insert_runs as insert_runs
from trainer.contract import events as ev


def load_run(engine: Engine, run_id: str) -> Run:
    """The run as the database has it now."""
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None, run_id
        return run


def token_for(settings: Settings, run_id: str, hours: float = 1) -> str:
    return mint_token(settings.signing_key, run_id, datetime.now(UTC) + timedelta(hours=hours))


def evaluation(stage: str, accuracy: float, labels: tuple[str, ...] = ("zero", "one")) -> Any:
    per_class = [
        ev.ClassMetrics(label=label, precision=accuracy, recall=accuracy, f1=accuracy, support=5)
        for label in labels
    ]
    return ev.Evaluation(
        stage=stage,  # type: ignore[arg-type]
        accuracy=accuracy,
        macro_f1=accuracy - 0.01,
        unknown_rate=0.0,
        num_samples=5 * len(labels),
        labels=list(labels),
        per_class=per_class,
        confusion_matrix=[
            [5 if i == j else 0 for j in range(len(labels) + 1)] for i in range(len(labels))
        ],
        predictions=[
            ev.Prediction(
                sample_id=f"s{i}",
                true_label="one",
                predicted_label="one",
                raw_answer="one",
                correct=True,
            )
            for i in range(3)
        ],
    )


def full_history(run_id: str, segment: int = 0, steps: int = 4) -> list[ev.Event]:
    """What a trainer sends over one successful execution, in order."""
    seq = iter(range(segment * 1_000_000, segment * 1_000_000 + 1000))

    def make(kind: str, data: Any = None) -> ev.Event:
        payload: dict[str, Any] = {
            "type": kind,
            "run_id": run_id,
            "seq": next(seq),
            "segment": segment,
        }
        if data is not None:
            payload["data"] = data.model_dump() if hasattr(data, "model_dump") else data
        return ev.EVENT_ADAPTER.validate_python(payload)

    out = [make("started"), make("phase", {"phase": "baseline_eval"})]
    out.append(make("evaluation", evaluation("baseline", 0.1)))
    out.append(make("phase", {"phase": "training"}))
    for step in range(1, steps + 1):
        out.append(
            make(
                "progress",
                ev.Progress(
                    step=step, total_steps=steps, epoch=step / steps, loss=3.0 - step * 0.5
                ),
            )
        )
    out.append(make("checkpoint", ev.Checkpoint(step=steps, uri=f"/ck/{run_id}/step-{steps}")))
    out.append(make("phase", {"phase": "final_eval"}))
    out.append(make("evaluation", evaluation("final", 0.9)))
    out.append(make("artifact", ev.Artifact(kind="output_dir", uri=f"/out/{run_id}")))
    out.append(make("completed", ev.Completed(step=steps)))
    return out
