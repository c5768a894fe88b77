"""Cloud Run as it really behaves (issue 15), over the real client library, the stricter fake
(tests/fakes/cloudrun_rules.py) and a real database: platform retries, a cancel racing a retry,
runs and executions that end together, long budgets as segments within the task timeout cap, a
Job deployed with an unnamed container, bounded waits for GPUs and IAM, orphaned executions, and
an api SIGKILLed right after `run_job`. Manual executions move only when a test says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient
from google.api.launch_stage_pb2 import LaunchStage
from google.cloud import run_v2
from sqlalchemy import Engine, update
from sqlmodel import select

from api.config import Settings
from api.db import session_scope, utcnow
from api.dispatch import cloudrun_job as cj
from api.dispatch.models import ExecutionStop
from api.dispatch.service import RetryPolicy
from api.dispatch.worker import Worker
from api.runs.service import lock_run
from tests.cloud.conftest import SIGNING_KEY
from tests.cloud.worker_world import (
    NO_WAIT,
    create_run,
    get_run,
)
from tests.fakes.cloudrun import FakeCloudRun, FakeExecution, Outcome


def post(client: TestClient, run_id: str, name: str, seq: int, event: dict[str, Any]) -> None:
    """The trainer's callback, with the token its execution's environment holds."""
    token = fake_env(name)["TUNEPLANE_CALLBACK_TOKEN"]
    body = {"run_id": run_id, "seq": seq, "id": uuid.uuid4().hex, **event}
    r = client.post(
        f"/api/v1/runs/{run_id}/events", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 201, r.text


_FAKES: list[FakeCloudRun] = []


def fake_env(name: str) -> dict[str, str]:
    return _FAKES[-1].execution(name).env()


@pytest.fixture(autouse=True)
def _remember_fake(fake_cloudrun: FakeCloudRun) -> Iterator[None]:
    _FAKES.append(fake_cloudrun)
    yield
    _FAKES.remove(fake_cloudrun)


def dispatch_manual(
    client: TestClient, worker: Worker, fake: FakeCloudRun, **spec: Any
) -> tuple[str, str]:
    fake.next_outcome(Outcome("manual"))
    run_id = create_run(client, **spec)
    assert worker.dispatch_ready() == 1
    return run_id, get_run(client, run_id)["execution_name"]


def test_a_task_that_fails_on_attempt_0_and_succeeds_on_attempt_1_completes_its_run(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun
) -> None:
    run_id, name = dispatch_manual(client, worker, fake_cloudrun)
    fake_cloudrun.start_attempt(name)
    post(client, run_id, name, 0, {"type": "started"})
    # The container is killed (GPU maintenance): no event, exit 137; Cloud Run retries it.
    fake_cloudrun.end_attempt(name, 137)
    assert fake_cloudrun.execution(name).to_proto().retried_count == 1
    worker.reconcile()
    assert get_run(client, run_id)["status"] == "running"  # a retried failure ends nothing
    ex = fake_cloudrun.start_attempt(name)
    assert ex.attempt == 1  # CLOUD_RUN_TASK_ATTEMPT of the retry
    post(client, run_id, name, 1, {"type": "started", "data": {"attempt": 1}})
    post(client, run_id, name, 2, {"type": "completed"})
    fake_cloudrun.end_attempt(name, 0)
    worker.reconcile()
    worker.stop_executions()  # it exited by itself: nothing to cancel
    run = get_run(client, run_id)
    assert run["status"] == "succeeded", run
    assert fake_cloudrun.calls("CancelExecution") == []
    assert fake_cloudrun.live_executions(run_id) == []


def test_a_cancel_racing_a_retry_stops_the_retry_and_cancels_the_run(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun
) -> None:
    run_id, name = dispatch_manual(client, worker, fake_cloudrun)
    fake_cloudrun.start_attempt(name)
    fake_cloudrun.end_attempt(name, 137)  # attempt 0 died; attempt 1 is about to start
    assert client.post(f"/api/v1/runs/{run_id}/cancel").status_code == 200
    worker.finish_cancels()  # the cancel reaches Cloud Run between the attempts
    ex = fake_cloudrun.execution(name)
    assert ex.state == "cancelled" and ex.attempt == 1
    with pytest.raises(AssertionError):
        fake_cloudrun.start_attempt(name)  # the retry never starts
    worker.finish_cancels()
    assert get_run(client, run_id)["status"] == "cancelled"


def test_a_run_that_ended_has_its_still_running_execution_cancelled(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun, engine: Engine
) -> None:
    run_id, name = dispatch_manual(client, worker, fake_cloudrun)
    fake_cloudrun.start_attempt(name)
    post(client, run_id, name, 0, {"type": "started"})
    post(client, run_id, name, 1, {"type": "failed", "data": {"error": "CUDA error"}})
    assert get_run(client, run_id)["status"] == "failed"
    worker.stop_executions()  # within the grace a trainer takes to exit: left alone
    assert fake_cloudrun.calls("CancelExecution") == []
    with session_scope(engine) as session:  # a minute passes (no clock in the test)
        (stop,) = session.exec(select(ExecutionStop).where(ExecutionStop.run_id == run_id))
        past = timedelta(seconds=worker.exit_grace_seconds + 1)
        stop.created_at -= past
        stop.next_attempt_at -= past
        session.commit()
    worker.stop_executions()  # the trainer hangs instead of exiting: Cloud Run is told to stop
    assert [r.name for r in fake_cloudrun.calls("CancelExecution")] == [name]
    fake_cloudrun.end_attempt(name, 143)
    assert fake_cloudrun.execution(name).state == "cancelled"
    with session_scope(engine) as session:  # the next look is due at once
        session.exec(update(ExecutionStop).values(next_attempt_at=utcnow()))
        session.commit()
    assert worker.stop_executions() == 1
    assert len(fake_cloudrun.calls("CancelExecution")) == 1  # seen ended: not asked again
    with session_scope(engine) as session:
        assert lock_run(session, run_id).execution_ended


def test_an_rtx_pro_6000_run_of_3_hours_runs_as_segments_each_within_the_task_timeout_cap(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun
) -> None:
    run_id, name = dispatch_manual(
        client, worker, fake_cloudrun, gpu_type="nvidia-rtx-pro-6000", time_budget_minutes=180
    )
    names = [name]
    for seq in range(3):
        fake_cloudrun.start_attempt(names[-1])
        post(client, run_id, names[-1], 2 * seq, {"type": "started", "segment": seq})
        done = {"step": 10 * (seq + 1), "checkpoint_uri": f"gs://tp-artifacts/runs/{run_id}/c"}
        post(
            client,
            run_id,
            names[-1],
            2 * seq + 1,
            {"type": "segment_done", "segment": seq, "data": done},
        )
        fake_cloudrun.end_attempt(names[-1], 0)
        fake_cloudrun.next_outcome(Outcome("manual"))
        assert worker.dispatch_ready() == 1
        names.append(get_run(client, run_id)["execution_name"])
    assert get_run(client, run_id)["segment"] == 3
    (job,) = [j for j in fake_cloudrun.jobs.values() if j.name.endswith("rtx-pro-6000")]
    assert job.launch_stage == LaunchStage.BETA  # the GPU is in Preview
    for request in fake_cloudrun.calls("RunJob"):
        assert request.overrides.timeout.total_seconds() <= 3600  # GPU tasks: 1 hour (GA)
        env = {e.name: e.value for e in request.overrides.container_overrides[0].env}
        sent = fake_cloudrun.execution(names[int(env["TUNEPLANE_SEGMENT"])]).create_time
        segment = datetime.fromisoformat(env["TUNEPLANE_DEADLINE"]) - sent
        assert segment <= timedelta(minutes=55) + timedelta(seconds=5)


def test_a_job_deployed_with_an_unnamed_container_is_updated_before_overrides_name_it(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun, settings: Settings
) -> None:
    deployed = cj.build_job(settings, "nvidia-l4")
    deployed.template.template.containers[
        0
    ].name = ""  # `gcloud run jobs deploy` without --container
    deployed.name = cj.job_name(settings, "nvidia-l4")
    fake_cloudrun.jobs[deployed.name] = deployed
    _, name = dispatch_manual(client, worker, fake_cloudrun)
    (update,) = fake_cloudrun.calls("UpdateJob")
    assert update.job.template.template.containers[0].name == "trainer"
    assert fake_cloudrun.execution(name).live


@pytest.mark.parametrize(
    ("code", "what"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "a GPU"),
        (grpc.StatusCode.PERMISSION_DENIED, "IAM permissions to propagate"),
    ],
)
def test_a_stock_out_or_unpropagated_iam_waits_a_bounded_time_then_fails_with_the_reason(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    fake_cloudrun: FakeCloudRun,
    code: grpc.StatusCode,
    what: str,
) -> None:
    policy = RetryPolicy(first_backoff_seconds=0, quota_retry_seconds=0, wait_seconds=3600)
    w = Worker(settings, engine, retry=policy)
    try:
        fake_cloudrun.fail("RunJob", code, "the platform's words", times=3)
        run_id = create_run(client)
        assert w.dispatch_ready() == 0
        run = get_run(client, run_id)
        assert run["status"] == "queued" and f"waiting for {what}" in run["status_reason"]
        with session_scope(engine) as session:  # an hour passes (no clock in the test)
            row = lock_run(session, run_id)
            row.waiting_since = utcnow() - timedelta(seconds=3601)
            session.commit()
        assert w.dispatch_ready() == 0
        run = get_run(client, run_id)
        assert run["status"] == "failed"
        assert (
            f"for {what}" in run["status_reason"] and "the platform's words" in run["status_reason"]
        )
    finally:
        w.stop()


def test_the_sweep_cancels_an_execution_of_a_run_that_is_not_its_recorded_one(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun, settings: Settings
) -> None:
    run_id, name = dispatch_manual(client, worker, fake_cloudrun)
    # A second execution carrying the same run id (an api that died before recording it).
    stray = run_v2.RunJobRequest(
        name=cj.job_name(settings, "nvidia-l4"),
        overrides=fake_cloudrun.calls("RunJob")[0].overrides,
    )
    fake_cloudrun.next_outcome(Outcome("manual"))
    worker.dispatcher.jobs.run_job(request=stray)  # type: ignore[attr-defined]
    assert len(fake_cloudrun.live_executions(run_id)) == 2
    worker.sweep_orphans()
    assert [e.name for e in fake_cloudrun.live_executions(run_id)] == [name]


ROOT = Path(__file__).resolve().parents[2]
# A worker process like `tuneplane worker`, for one pass: claim, mark, run_job, record.
WORKER = """
import json, sys
from api.config import Settings
from api.db import make_engine
from api.dispatch.worker import Worker
values = json.loads(sys.argv[1])
settings = Settings(**values)
Worker(settings, make_engine(settings.db_url)).dispatch_ready()
"""


def test_an_api_killed_right_after_run_job_leaves_one_execution_after_its_restart(
    client: TestClient, engine: Engine, settings: Settings, fake_cloudrun: FakeCloudRun
) -> None:
    run_id = create_run(client)
    started: list[FakeExecution] = []
    killed = threading.Event()
    proc: subprocess.Popen[bytes] | None = None

    def kill_the_api(ex: FakeExecution) -> None:
        # Cloud Run has started the execution; the api dies before it hears the answer.
        started.append(ex)
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        killed.set()

    fake_cloudrun.after_run_job = kill_the_api
    fake_cloudrun.next_outcome(Outcome("manual"))
    values: dict[str, Any] = {
        k: getattr(settings, k)
        for k in ("dispatcher", "gcp_project", "trainer_image", "bucket", "public_url")
    }
    values.update(
        database_url=settings.db_url,
        data_dir=str(settings.data_dir),
        callback_signing_key=SIGNING_KEY,
        cloud_run_endpoint=fake_cloudrun.endpoint,
        run_worker=False,
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(values)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert killed.is_set() and len(started) == 1
    fake_cloudrun.after_run_job = None
    run = get_run(client, run_id)
    assert run["status"] == "queued" and run["execution_name"] is None  # never recorded

    with session_scope(engine) as session:  # the dead worker's claim runs out (no clock here)
        row = lock_run(session, run_id)
        assert row.launched_at is not None  # the marker went in before run_job
        row.claim_expires_at = utcnow()
        session.commit()
    restarted = Worker(settings, engine, retry=NO_WAIT)
    try:
        restarted.sweep_orphans()  # the marker protects the unrecorded execution
        assert restarted.dispatch_ready() == 1
        restarted.sweep_orphans()
    finally:
        restarted.stop()
    live = fake_cloudrun.live_executions(run_id)
    assert [e.name for e in live] == [started[0].name]  # adopted, not started twice
    assert len(fake_cloudrun.calls("RunJob")) == 1
    run = get_run(client, run_id)
    assert run["status"] == "dispatched" and run["execution_name"] == started[0].name
