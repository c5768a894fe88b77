"""CloudRunDispatcher against the fake Cloud Run server, over a real gRPC connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from api.config import Settings
from api.dispatch.base import DispatchError, Launch
from api.dispatch.cloudrun import CloudRunDispatcher
from tests.fakes.cloudrun import FakeCloudRun, Outcome
from trainer.contract.execution import ExecutionEnv
from trainer.contract.spec import RunSpec

SPEC = RunSpec(model_id="google/gemma-3-4b-it", dataset="digits", time_budget_minutes=30)
JOBS = "projects/tp-test/locations/us-central1/jobs"


def launch(run_id: str = "run_1", spec: RunSpec = SPEC, segment: int = 0) -> Launch:
    env = ExecutionEnv(
        run_id=run_id,
        callback_url=f"https://api.example/api/v1/runs/{run_id}/events",
        callback_token=f"token-of-{run_id}",
        deadline=datetime.now(UTC) + timedelta(minutes=spec.time_budget_minutes),
        segment=segment,
    )
    return Launch(run_id=run_id, spec=spec, env=env)


@pytest.fixture
def make_dispatcher(
    cloud_settings: Callable[..., Settings],
) -> Iterator[Callable[..., CloudRunDispatcher]]:
    made: list[CloudRunDispatcher] = []

    def make(retry_budget_seconds: float = 1.5, **overrides: object) -> CloudRunDispatcher:
        d = CloudRunDispatcher(
            cloud_settings(**overrides),
            retry_budget_seconds=retry_budget_seconds,
            first_backoff_seconds=0.05,
        )
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_job_is_created_once_and_updated_only_when_its_template_changed(
    fake_cloudrun: FakeCloudRun, make_dispatcher: Callable[..., CloudRunDispatcher]
) -> None:
    first = make_dispatcher()
    first.start(launch("run_1"))
    first.start(launch("run_2"))
    assert len(fake_cloudrun.calls("CreateJob")) == 1
    assert len(fake_cloudrun.calls("GetJob")) == 1  # checked once per process

    # A new api process with the same settings: reads the Job, finds it equal, leaves it.
    make_dispatcher().start(launch("run_3"))
    assert len(fake_cloudrun.calls("CreateJob")) == 1
    assert fake_cloudrun.calls("UpdateJob") == []

    # A new trainer image: the Job is updated before the run starts.
    make_dispatcher(trainer_image="us-central1-docker.pkg.dev/tp-test/tuneplane/trainer:2").start(
        launch("run_4")
    )
    (update,) = fake_cloudrun.calls("UpdateJob")
    assert update.job.name == f"{JOBS}/tuneplane-trainer-l4"
    assert update.job.template.template.containers[0].image.endswith("trainer:2")
    names = [m for m, _ in fake_cloudrun.requests if m in ("UpdateJob", "RunJob")]
    assert names[-2:] == ["UpdateJob", "RunJob"]

    # Another GPU type is another Job.
    make_dispatcher().start(
        launch("run_5", SPEC.model_copy(update={"gpu_type": "nvidia-rtx-pro-6000"}))
    )
    created = [c.job_id for c in fake_cloudrun.calls("CreateJob")]
    assert created == ["tuneplane-trainer-l4", "tuneplane-trainer-rtx-pro-6000"]
    job = fake_cloudrun.jobs[f"{JOBS}/tuneplane-trainer-rtx-pro-6000"]
    assert job.template.template.containers[0].resources.limits["cpu"] == "20"


def test_start_returns_the_execution_at_once_with_the_runs_overrides(
    fake_cloudrun: FakeCloudRun, make_dispatcher: Callable[..., CloudRunDispatcher]
) -> None:
    # Pending until the test lets it go: "still pending" holds on any machine.
    leave_pending = threading.Event()
    fake_cloudrun.next_outcome(Outcome("hang", pending_s=600, leave_pending=leave_pending))
    dispatcher = make_dispatcher()
    execution = dispatcher.start(launch("run_7", segment=1))

    # Named before it even left `pending`; RunJob's operation was never waited on.
    assert fake_cloudrun.execution(execution.name).state == "pending"
    assert execution.name.startswith(f"{JOBS}/tuneplane-trainer-l4/executions/")
    assert fake_cloudrun.calls("GetOperation") == fake_cloudrun.calls("WaitOperation") == []
    assert execution.artifact_uri == "gs://tp-artifacts/runs/run_7"
    assert execution.checkpoint_uri == "gs://tp-artifacts/runs/run_7/checkpoints"
    assert execution.log_uri

    (request,) = fake_cloudrun.calls("RunJob")
    (container,) = request.overrides.container_overrides
    env = {e.name: e.value for e in container.env}
    assert env["TUNEPLANE_RUN_ID"] == "run_7"
    assert env["TUNEPLANE_SEGMENT"] == "1"
    assert env["TUNEPLANE_CALLBACK_TOKEN"] == "token-of-run_7"
    assert env["TUNEPLANE_ARTIFACT_URI"] == "gs://tp-artifacts/runs/run_7"
    assert env["TUNEPLANE_CHECKPOINT_URI"] == "gs://tp-artifacts/runs/run_7/checkpoints"
    assert "TUNEPLANE_DEADLINE" in env
    assert list(container.args[-4:]) == [
        "--gcs-output-path",
        "gs://tp-artifacts/runs/run_7",
        "--device",
        "cuda",
    ]
    assert "--time-budget-minutes" in container.args
    assert request.overrides.timeout.total_seconds() == 35 * 60

    # The execution the platform runs has the job's secret and the run's values together.
    ran = fake_cloudrun.execution(execution.name).template.containers[0]
    assert {e.name for e in ran.env} >= {"HF_TOKEN", "TUNEPLANE_RUN_ID"}

    leave_pending.set()
    fake_cloudrun.wait_for(execution.name, "running")
    assert dispatcher.status(execution.name).state == "running"


def test_oidc_mode_keeps_the_token_out_of_the_overrides(
    fake_cloudrun: FakeCloudRun, make_dispatcher: Callable[..., CloudRunDispatcher]
) -> None:
    make_dispatcher(callback_auth="oidc").start(launch("run_8"))
    (request,) = fake_cloudrun.calls("RunJob")
    env = {e.name for e in request.overrides.container_overrides[0].env}
    assert "TUNEPLANE_CALLBACK_TOKEN" not in env
    assert "TUNEPLANE_CALLBACK_URL" in env


def wait_state(d: CloudRunDispatcher, name: str, *states: str) -> tuple[str, str | None]:
    deadline = time.monotonic() + 120  # a hang guard
    while time.monotonic() < deadline:
        status = d.status(name)
        if status.state in states:
            return status.state, status.message
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached {states}: {d.status(name)}")


def test_status_follows_the_execution_with_the_platforms_own_words(
    fake_cloudrun: FakeCloudRun, make_dispatcher: Callable[..., CloudRunDispatcher]
) -> None:
    d = make_dispatcher()
    fake_cloudrun.next_outcome(Outcome("succeed"))
    ok = d.start(launch("run_a"))
    fake_cloudrun.next_outcome(Outcome("fail", exit_code=137))
    oom = d.start(launch("run_b"))
    fake_cloudrun.next_outcome(Outcome("timeout"))
    slow = d.start(launch("run_c"))

    assert wait_state(d, ok.name, "succeeded") == ("succeeded", None)
    _, message = wait_state(d, oom.name, "failed")
    assert "non-zero status of 137" in (message or "")
    assert "NON_ZERO_EXIT_CODE" in (message or "")
    _, message = wait_state(d, slow.name, "failed")
    assert "timeout was reached" in (message or "")


def test_cancel_goes_through_the_executions_api(
    fake_cloudrun: FakeCloudRun, make_dispatcher: Callable[..., CloudRunDispatcher]
) -> None:
    d = make_dispatcher()
    fake_cloudrun.next_outcome(Outcome("hang"))
    execution = d.start(launch("run_c"))
    fake_cloudrun.wait_for(execution.name, "running")
    d.cancel(execution.name)
    assert [r.name for r in fake_cloudrun.calls("CancelExecution")] == [execution.name]
    _, message = wait_state(d, execution.name, "cancelled")
    assert "cancelled" in (message or "")
    d.cancel(execution.name)  # already over: nothing to do, no error
    d.cancel(f"{JOBS}/tuneplane-trainer-l4/executions/gone-12345")  # never existed: same


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL],
)
def test_transient_errors_are_retried_with_backoff(
    fake_cloudrun: FakeCloudRun,
    make_dispatcher: Callable[..., CloudRunDispatcher],
    code: grpc.StatusCode,
) -> None:
    d = make_dispatcher()
    fake_cloudrun.fail("GetJob", code, "the service is restarting")
    fake_cloudrun.fail("RunJob", code, "backend busy", times=2)
    execution = d.start(launch("run_t"))
    assert len(fake_cloudrun.calls("RunJob")) == 3
    assert list(fake_cloudrun.executions) == [execution.name]  # three tries, one execution


def test_transient_errors_past_the_budget_are_reported_transient(
    fake_cloudrun: FakeCloudRun, make_dispatcher: Callable[..., CloudRunDispatcher]
) -> None:
    # A budget already spent when the first answer comes: one try, then `transient` (the worker
    # retries later). How many tries a budget of seconds allows depends on the machine's speed,
    # so the count is asserted at the budget where it is determined.
    d = make_dispatcher(retry_budget_seconds=0)
    fake_cloudrun.fail("RunJob", grpc.StatusCode.UNAVAILABLE, "down for maintenance", times=100)
    with pytest.raises(DispatchError) as info:
        d.start(launch("run_u"))
    assert info.value.kind == "transient"
    assert "UNAVAILABLE down for maintenance" in info.value.message
    assert "(after 1 attempts; will retry)" in info.value.message
    assert len(fake_cloudrun.calls("RunJob")) == 1
    assert fake_cloudrun.executions == {}


def test_a_run_job_whose_answer_was_lost_is_not_started_twice(
    fake_cloudrun: FakeCloudRun, make_dispatcher: Callable[..., CloudRunDispatcher]
) -> None:
    d = make_dispatcher()
    d.ensure_job("nvidia-l4")
    # The execution is created, then the answer times out on the way back.
    fake_cloudrun.fail("RunJob", grpc.StatusCode.DEADLINE_EXCEEDED, after_handling=True)
    execution = d.start(launch("run_lost"))
    assert len(fake_cloudrun.calls("RunJob")) == 1
    assert list(fake_cloudrun.executions) == [execution.name]


def test_quota_errors_are_reported_as_quota(
    fake_cloudrun: FakeCloudRun, make_dispatcher: Callable[..., CloudRunDispatcher]
) -> None:
    fake_cloudrun.fail(
        "RunJob",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Quota exceeded for total allowable count of GPUs per project per region",
    )
    with pytest.raises(DispatchError) as info:
        make_dispatcher().start(launch("run_q"))
    assert info.value.kind == "quota"
    assert "Quota exceeded for total allowable count of GPUs" in info.value.message
    assert "stays queued" in info.value.message
    assert len(fake_cloudrun.calls("RunJob")) == 1  # not hammered: the worker waits


@pytest.mark.parametrize(
    ("method", "hint"),
    [("RunJob", "roles/run.developer"), ("CreateJob", "roles/iam.serviceAccountUser")],
)
def test_permission_denied_is_an_iam_wait_that_says_what_to_grant(
    fake_cloudrun: FakeCloudRun,
    make_dispatcher: Callable[..., CloudRunDispatcher],
    method: str,
    hint: str,
) -> None:
    # Right after deploy.sh the roles may not apply yet: the worker waits (bounded), then fails.
    fake_cloudrun.fail(method, grpc.StatusCode.PERMISSION_DENIED, "the server's own words")
    with pytest.raises(DispatchError) as info:
        make_dispatcher().start(launch("run_p"))
    assert info.value.kind == "iam"
    assert "the server's own words" in info.value.message and hint in info.value.message
    assert len(fake_cloudrun.calls(method)) == 1  # not hammered: the worker waits


@pytest.mark.parametrize(
    ("method", "code", "hint"),
    [
        ("GetJob", grpc.StatusCode.INVALID_ARGUMENT, "TUNEPLANE_TRAINER_IMAGE"),
        ("CreateJob", grpc.StatusCode.NOT_FOUND, "TUNEPLANE_GCP_PROJECT (tp-test)"),
        ("RunJob", grpc.StatusCode.UNAUTHENTICATED, "application-default login"),
    ],
)
def test_permanent_errors_say_what_to_fix(
    fake_cloudrun: FakeCloudRun,
    make_dispatcher: Callable[..., CloudRunDispatcher],
    method: str,
    code: grpc.StatusCode,
    hint: str,
) -> None:
    fake_cloudrun.fail(method, code, "the server's own words")
    with pytest.raises(DispatchError) as info:
        make_dispatcher().start(launch("run_p"))
    assert info.value.kind == "permanent"
    assert "the server's own words" in info.value.message
    assert hint in info.value.message
    assert len(fake_cloudrun.calls(method)) == 1  # never retried


def test_a_deleted_job_is_made_again(
    fake_cloudrun: FakeCloudRun, make_dispatcher: Callable[..., CloudRunDispatcher]
) -> None:
    d = make_dispatcher()
    d.start(launch("run_1"))
    fake_cloudrun.jobs.clear()  # someone deleted it in the console
    d.start(launch("run_2"))
    assert len(fake_cloudrun.calls("CreateJob")) == 2
    assert len(fake_cloudrun.executions) == 2


def test_status_of_a_vanished_execution_fails_and_an_unreachable_api_is_unknown(
    fake_cloudrun: FakeCloudRun, make_dispatcher: Callable[..., CloudRunDispatcher]
) -> None:
    d = make_dispatcher()
    gone = d.status(f"{JOBS}/tuneplane-trainer-l4/executions/gone-12345")
    assert gone.state == "failed" and "no execution" in (gone.message or "")
    execution = d.start(launch("run_s"))
    fake_cloudrun.fail("GetExecution", grpc.StatusCode.UNAVAILABLE, "flaky", times=100)
    unknown = d.status(execution.name)
    assert unknown.state == "unknown" and "flaky" in (unknown.message or "")
