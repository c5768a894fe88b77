"""Helpers of the template, gate and webhook tests: make a template, trigger a run, and carry
a run to its end through the real callback endpoint, as a worker and a trainer would."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.config import Settings
from api.db import session_scope
from api.runs.service import lock_run
from api.runs.states import RunStatus
from api.runs.status import set_status
from tests.api.factories import token_for
from trainer.contract import events as ev

SPEC = {"model_id": "google/gemma-3-4b-it", "dataset": "digits", "train_size": 100}


def make_template(client: TestClient, name: str = "pets", **body: Any) -> dict[str, Any]:
    r = client.post("/api/v1/templates", json={"name": name, "spec": SPEC, **body})
    assert r.status_code == 201, r.text
    return r.json()


def trigger(
    client: TestClient, name: str = "pets", key: str | None = None, **body: Any
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(f"/api/v1/templates/{name}/runs", json=body, headers=headers)


def final_evaluation(correct: list[bool]) -> dict[str, Any]:
    n = len(correct)
    acc = sum(correct) / n
    labels = ["zero", "one"]
    preds = [
        {
            "sample_id": f"s{i}",
            "true_label": "one",
            "predicted_label": "one" if ok else "zero",
            "raw_answer": "one" if ok else "zero",
            "correct": ok,
        }
        for i, ok in enumerate(correct)
    ]
    return ev.Evaluation(
        stage="final",
        accuracy=acc,
        macro_f1=acc,
        unknown_rate=0.0,
        num_samples=n,
        labels=labels,
        per_class=[],
        confusion_matrix=[[0, 0, 0], [n - sum(correct), sum(correct), 0]],
        predictions=preds,  # type: ignore[arg-type]
    ).model_dump(mode="json")


def finish(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    run_id: str,
    correct: list[bool] | None,
    end: str = "completed",
) -> dict[str, Any]:
    """Dispatch the run (as the worker would) and post the trainer's events to the callback."""
    with session_scope(engine) as session:
        run = lock_run(session, run_id)
        set_status(session, run, RunStatus.dispatched, "test dispatch")
        run.execution_name = "test:1"
        session.commit()
    auth = {"Authorization": f"Bearer {token_for(settings, run_id)}"}
    events: list[dict[str, Any]] = [{"type": "started"}]
    if correct is not None:
        events.append({"type": "evaluation", "data": final_evaluation(correct)})
    events.append(
        {"type": "completed"} if end == "completed" else {"type": "failed", "data": {"error": "x"}}
    )
    for seq, event in enumerate(events):
        body = {"run_id": run_id, "seq": seq, "id": uuid.uuid4().hex, **event}
        r = client.post(f"/api/v1/runs/{run_id}/events", json=body, headers=auth)
        assert r.status_code == 201, r.text
    return client.get(f"/api/v1/runs/{run_id}").json()
