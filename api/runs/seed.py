"""Runs written straight into the database in a given state, with no request, dispatch or
check: what a test or a benchmark starts from (tests/api/factories.py, bench/ingest.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from api.db import session_scope, utcnow
from api.runs.models import Run
from api.runs.states import RunStatus
from trainer.contract.spec import RunSpec

SPEC = RunSpec(model_id="google/gemma-3-4b-it", dataset="digits")


def insert_runs(
    engine: Engine,
    n: int = 1,
    *,
    status: RunStatus = RunStatus.dispatched,
    segment: int = 0,
    **fields: Any,
) -> list[str]:
    """The ids of `n` new runs of SPEC in `status`, oldest first (created a millisecond apart,
    an hour ago). A run past the queue has an execution (`fake:<i>` unless `execution_name`
    is given), as the worker would have recorded."""
    base = utcnow() - timedelta(hours=1)
    execution_name = fields.pop("execution_name", None)
    runs = [
        Run(
            spec=SPEC.model_dump(mode="json"),
            model_id=SPEC.model_id,
            dataset=SPEC.dataset,
            gpu_type=SPEC.gpu_type,
            status=status,
            segment=segment,
            created_at=base + timedelta(milliseconds=i),
            execution_name=execution_name or (f"fake:{i}" if status != RunStatus.queued else None),
            **fields,
        )
        for i in range(n)
    ]
    with session_scope(engine) as session:
        session.add_all(runs)
        session.commit()
        return [r.id for r in runs]
