"""The dispatch worker with the real CloudRunDispatcher, against the fake Cloud Run server and a
real database: what each outcome of a start and of an execution does to the run."""

from __future__ import annotations

import time

import grpc
import pytest
from fastapi.testclient import TestClient

from api.dispatch.worker import Worker
from tests.cloud.worker_world import (
    create_run,
    get_run,
    reconcile_until,
)
from tests.fakes.cloudrun import FakeCloudRun, Outcome


def test_the_execution_name_is_stored_as_soon_as_it_is_started(
    client: TestClient, worker: Worker, fake_cloudrun: FakeCloudRun
) -> None:
    fake_cloudrun.next_outcome(Outcome("hang", pending_s=600))  # pending throughout the test
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
    deadline = time.monotonic() + 120  # a hang guard
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
