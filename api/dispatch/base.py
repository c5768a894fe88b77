"""The small interface every dispatcher implements, and the errors the worker reacts to."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Protocol, runtime_checkable

from api.config import Settings
from trainer.contract.execution import ExecutionEnv
from trainer.contract.spec import RunSpec

ExecutionStateName = Literal["pending", "running", "succeeded", "failed", "cancelled", "unknown"]
# The states an execution never leaves.
ENDED: frozenset[ExecutionStateName] = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Launch:
    """One execution (segment) to start. `env` already holds run id, callback URL, token,
    segment and deadline; the dispatcher adds the artifact and checkpoint locations it owns."""

    run_id: str
    spec: RunSpec
    env: ExecutionEnv


@dataclass(frozen=True)
class Execution:
    name: str  # the dispatcher's handle: a Cloud Run execution name, or "local:<run>:<segment>:..."
    log_uri: str | None = None
    artifact_uri: str | None = None
    checkpoint_uri: str | None = None


@dataclass(frozen=True)
class ExecutionStatus:
    state: ExecutionStateName
    # The platform's own words when it ended badly: exit code and log tail, "Task timed out", ...
    message: str | None = None


class DispatchError(Exception):
    """`transient`: retry soon with backoff; `quota` (no GPU free) and `iam` (permission denied,
    e.g. roles not propagated yet): leave the run queued and retry for a bounded time;
    `permanent`: fail the run with this message (it says what to fix)."""

    def __init__(
        self, kind: Literal["transient", "quota", "iam", "permanent"], message: str
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Found:
    """A live execution and the run and segment its environment says it serves."""

    name: str
    run_id: str
    segment: int


class Dispatcher(Protocol):
    def start(self, launch: Launch) -> Execution:
        """Start the execution and return its handle at once; never wait for it to end."""
        ...

    def cancel(self, execution_name: str) -> None:
        """Ask the execution to stop (SIGTERM first, so it can checkpoint)."""
        ...

    def status(self, execution_name: str) -> ExecutionStatus: ...

    def close(self) -> None: ...


@runtime_checkable
class Owning(Protocol):
    """A dispatcher that sees only some executions: the local one sees those whose files are in
    its data directory. Another replica's are that replica's to watch, stop and judge."""

    def owns(self, execution_name: str) -> bool: ...


@runtime_checkable
class Interruptible(Dispatcher, Protocol):
    """A dispatcher whose executions end when the service stops (the local one: they are this
    machine's processes). `interrupt` asks one to end its segment with a checkpoint."""

    def interrupt(self, execution_name: str) -> None: ...


def owned(dispatcher: Dispatcher, execution_name: str) -> bool:
    """Whether `dispatcher` may judge the execution (every one, unless it is `Owning`)."""
    return not isinstance(dispatcher, Owning) or dispatcher.owns(execution_name)


# https://cloud.google.com/run/docs/configuring/task-timeout: "For tasks using GPUs, the maximum
# available timeout is 1 hour", or "12 hours (preview)" as "Long running GPU jobs". Here, not in
# cloudrun_job.py, because the api's estimate needs the cap too, without the Google libraries.
GPU_TASK_SECONDS_GA = 3600
GPU_TASK_SECONDS_PREVIEW = 12 * 3600


def max_task_seconds(settings: Settings) -> int:
    """The longest task timeout Cloud Run takes for a GPU task with these settings."""
    return GPU_TASK_SECONDS_PREVIEW if settings.cloud_run_long_gpu_tasks else GPU_TASK_SECONDS_GA


def segment_cap(settings: Settings) -> timedelta | None:
    """The longest segment the configured dispatcher allows: on Cloud Run, what the task timeout
    cap leaves beside the margin for the final save; locally, none."""
    if settings.dispatcher != "cloudrun":
        return None
    margin = settings.cloud_run_timeout_margin_minutes * 60
    return timedelta(seconds=max_task_seconds(settings) - margin)


def segment_length(settings: Settings, spec: RunSpec) -> timedelta:
    """How long one execution of `spec` may run: the spec's time budget, or
    `segment_seconds_max` or the dispatcher's cap when shorter, so a budget longer than one
    Cloud Run task may run becomes several segments (each resumes from the last checkpoint),
    never a timeout over the cap. The one formula behind the worker's deadlines and the run's
    estimate (api/runs/estimates.py), so the estimate counts the segments the run will get."""
    budget = timedelta(minutes=spec.time_budget_minutes)
    if settings.segment_seconds_max is not None:
        budget = min(budget, timedelta(seconds=settings.segment_seconds_max))
    cap = segment_cap(settings)
    if cap is not None:
        budget = min(budget, cap)
    return budget
