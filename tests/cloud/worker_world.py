"""Helpers the Cloud Run worker tests share (their fixtures, `settings` `engine` `client`
`worker`, are in tests/cloud/conftest.py): create and read runs through the api."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from api.dispatch.service import RetryPolicy
from api.dispatch.worker import Worker

SPEC = {"model_id": "google/gemma-3-4b-it", "dataset": "digits", "time_budget_minutes": 20}
NO_WAIT = RetryPolicy(max_attempts=3, first_backoff_seconds=0, quota_retry_seconds=0)


def create_run(client: TestClient, **spec: Any) -> str:
    response = client.post("/api/v1/runs", json={"spec": {**SPEC, **spec}})
    assert response.status_code == 201, response.text
    run_id: str = response.json()["id"]
    return run_id


def get_run(client: TestClient, run_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/runs/{run_id}")
    assert response.status_code == 200
    run: dict[str, Any] = response.json()
    return run


def reconcile_until(
    worker: Worker, client: TestClient, run_id: str, *states: str
) -> dict[str, Any]:
    deadline = time.monotonic() + 120  # a hang guard
    while time.monotonic() < deadline:
        worker.reconcile()
        run = get_run(client, run_id)
        if run["status"] in states:
            return run
        time.sleep(0.1)
    raise AssertionError(f"{run_id} stayed {get_run(client, run_id)['status']}")
