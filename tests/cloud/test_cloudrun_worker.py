"""The dispatch worker with the real CloudRunDispatcher, against the fake Cloud Run server and a
real database: what each outcome of a start and of an execution does to the run."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient
from google.api.launch_stage_pb2 import LaunchStage
from google.cloud import run_v2
from sqlalchemy import Engine

from api.config import Settings
from api.db import make_engine, migrate, session_scope
from api.dispatch import cloudrun_job as cj
from api.main import create_app
from api.models.types import utcnow
from api.services.dispatch import RetryPolicy
from api.services.runs import lock_run
from api.worker import Worker
from tests.cloud.conftest import cloud_values
from tests.fakes.cloudrun import FakeCloudRun, Outcome

SPEC = {"model_id": "google/gemma-3-4b-it", "dataset": "digits", "time_budget_minutes": 20}
NO_WAIT = RetryPolicy(max_attempts=3, first_backoff_seconds=0, quota_retry_seconds=0)


@pytest.fixture
def settings(make_settings: Callable[..., Settings], fake_cloudrun: FakeCloudRun) -> Settings:
    return make_settings(**cloud_values(cloud_run_endpoint=fake_cloudrun.endpoint))


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    eng = make_engine(settings.db_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def worker(settings: Settings, engine: Engine) -> Iterator[Worker]:
    w = Worker(settings, engine, retry=NO_WAIT)  # its dispatcher: make_dispatcher -> Cloud Run
    yield w
    w.stop()


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
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        worker.reconcile()
        run = get_run(client, run_id)
        if run["status"] in states:
            return run
        time.sleep(0.1)
    raise AssertionError(f"{run_id} stayed {get_run(client, run_id)['status']}")


def test_the_execution_name_is_stored_as_soon_as_it_is_started(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun
) -> None:
    fake_cloudrun.next_outcome(Outcome("hang", pending_s=5))
    run_id = create_run(client)
    assert worker.dispatch_ready() == 1
    run = get_run(client, run_id)
    (name,) = fake_cloudrun.executions
    assert fake_cloudrun.execution(name).state == "pending"  # the run did not wait for it
    assert run["status"] == "dispatched"
    assert run["execution_name"] == name
    assert run["artifact_uri"] == f"gs://tp-artifacts/runs/{run_id}"
    assert run["log_uri"] == fake_cloudrun.execution(name).to_proto().log_uri
    (request,) = fake_cloudrun.calls("RunJob")
    env = {e.name: e.value for e in request.overrides.container_overrides[0].env}
    assert env["TUNEPLANE_RUN_ID"] == run_id
    assert env["TUNEPLANE_CALLBACK_URL"].endswith(f"/api/v1/runs/{run_id}/events")
    assert env["TUNEPLANE_CALLBACK_TOKEN"].startswith("tpr1.")


@pytest.mark.parametrize(
    ("outcome", "words"),
    [
        (Outcome("fail", exit_code=137), "non-zero status of 137"),
        (Outcome("timeout"), "The configured timeout was reached"),
    ],
)
def test_an_execution_that_ends_without_a_final_event_fails_its_run(
    client: TestClient,
    worker: Worker,
    fake_cloudrun: FakeCloudRun,
    outcome: Outcome,
    words: str,
) -> None:
    fake_cloudrun.next_outcome(outcome)
    run_id = create_run(client)
    worker.dispatch_ready()
    run = reconcile_until(worker, client, run_id, "failed")
    assert words in run["status_reason"]  # Cloud Run's own words reach the run


def test_a_cancelled_run_is_cancelled_through_cloud_run(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun
) -> None:
    fake_cloudrun.next_outcome(Outcome("hang"))
    run_id = create_run(client)
    worker.dispatch_ready()
    assert client.post(f"/api/v1/runs/{run_id}/cancel").status_code == 200
    deadline = time.monotonic() + 15
    while get_run(client, run_id)["status"] != "cancelled":
        assert time.monotonic() < deadline, get_run(client, run_id)
        worker.finish_cancels()
        time.sleep(0.1)
    name = get_run(client, run_id)["execution_name"]
    assert [r.name for r in fake_cloudrun.calls("CancelExecution")][:1] == [name]
    assert fake_cloudrun.execution(name).state == "cancelled"


def test_transient_errors_are_retried_before_the_worker_sees_them(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun
) -> None:
    fake_cloudrun.fail("RunJob", grpc.StatusCode.UNAVAILABLE, "try again", times=2)
    run_id = create_run(client)
    assert worker.dispatch_ready() == 1
    assert get_run(client, run_id)["status"] == "dispatched"
    assert len(fake_cloudrun.calls("RunJob")) == 3 and len(fake_cloudrun.executions) == 1


def test_no_gpu_quota_leaves_the_run_queued_with_the_reason_then_it_starts(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun
) -> None:
    fake_cloudrun.fail(
        "RunJob",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Quota exceeded for total allowable count of GPUs per project per region",
    )
    run_id = create_run(client)
    assert worker.dispatch_ready() == 0
    run = get_run(client, run_id)
    assert run["status"] == "queued"
    assert "waiting for a GPU" in run["status_reason"]
    assert "Quota exceeded for total allowable count of GPUs" in run["status_reason"]
    assert run["execution_name"] is None

    assert worker.dispatch_ready() == 1  # the quota came back
    assert get_run(client, run_id)["status"] == "dispatched"


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "TUNEPLANE_TRAINER_IMAGE"),
        (grpc.StatusCode.NOT_FOUND, "TUNEPLANE_GCP_REGION"),
    ],
)
def test_a_permanent_error_fails_the_run_with_what_to_fix(
    client: TestClient,
    worker: Worker,
    fake_cloudrun: FakeCloudRun,
    code: grpc.StatusCode,
    fix: str,
) -> None:
    fake_cloudrun.fail("RunJob", code, "the platform's words", times=2)
    run_id = create_run(client)
    worker.dispatch_ready()
    run = get_run(client, run_id)
    assert run["status"] == "failed"
    assert "the platform's words" in run["status_reason"] and fix in run["status_reason"]


# -- Cloud Run as it really behaves (issue 15) ----------------------------------------------------


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
    worker.close_executions()
    run = get_run(client, run_id)
    assert run["status"] == "succeeded", run
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
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun
) -> None:
    run_id, name = dispatch_manual(client, worker, fake_cloudrun)
    fake_cloudrun.start_attempt(name)
    post(client, run_id, name, 0, {"type": "started"})
    post(client, run_id, name, 1, {"type": "failed", "data": {"error": "CUDA error"}})
    assert get_run(client, run_id)["status"] == "failed"
    worker.close_executions()  # the trainer hangs instead of exiting: Cloud Run is told to stop
    assert [r.name for r in fake_cloudrun.calls("CancelExecution")] == [name]
    fake_cloudrun.end_attempt(name, 143)
    assert fake_cloudrun.execution(name).state == "cancelled"
    worker.close_executions()
    assert len(fake_cloudrun.calls("CancelExecution")) == 1  # seen ended: not asked again


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
