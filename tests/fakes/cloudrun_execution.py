"""One execution of the fake Cloud Run (tests/fakes/cloudrun.py) and how a scripted one plays."""

from __future__ import annotations

import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from google.cloud import run_v2

Cond = run_v2.Condition
ENDED = ("succeeded", "failed", "cancelled")
TIMEOUT_MESSAGE = "The configured timeout was reached."


@dataclass
class Outcome:
    """How a scripted execution plays. `end` is how each task attempt ends ("hang" runs until
    cancelled; "manual": the test moves it with `start_attempt` / `end_attempt`); `then` gives
    the ends of later attempts (the last one repeats), e.g. `Outcome("fail", then=("succeed",))`."""

    end: Literal["succeed", "fail", "timeout", "hang", "manual"] = "succeed"
    pending_s: float = 0.05
    running_s: float = 0.2
    exit_code: int = 1
    then: tuple[str, ...] = ()
    # Set by the test to end `pending` at once: a test that asserts "still pending" holds the
    # execution there with a long pending_s and lets it go with this, not with a short delay.
    leave_pending: threading.Event | None = None

    def end_of(self, attempt: int) -> str:
        ends = (self.end, *self.then)
        return ends[min(attempt, len(ends) - 1)]


@dataclass
class FakeExecution:
    name: str
    job: str
    template: run_v2.TaskTemplate
    operation: str
    max_retries: int
    launch_stage: int = 0
    create_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    start_time: datetime | None = None
    completion_time: datetime | None = None
    # "retrying": an attempt failed and the task waits for its next one. The API shows no
    # such state by name; the counts below are how it reads ([execution.proto]).
    state: Literal["pending", "running", "retrying", "succeeded", "failed", "cancelled"] = "pending"
    message: str = ""
    reason: Any = None
    attempt: int = 0  # CLOUD_RUN_TASK_ATTEMPT of the current (or last) attempt
    cancel_requested: bool = False
    process: subprocess.Popen[bytes] | None = None
    history: list[str] = field(default_factory=lambda: ["pending"])
    logs: list[Path] = field(default_factory=list)  # one per task attempt

    @property
    def short(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def retried(self) -> int:
        return self.attempt

    @property
    def live(self) -> bool:
        return self.state not in ENDED

    def env(self) -> dict[str, str]:
        return {e.name: e.value for e in self.template.containers[0].env}

    def to_proto(self) -> run_v2.Execution:
        conditions = []
        if self.start_time:
            conditions.append(Cond(type_="Started", state=Cond.State.CONDITION_SUCCEEDED))
        done = {
            "succeeded": Cond.State.CONDITION_SUCCEEDED,
            "failed": Cond.State.CONDITION_FAILED,
            "cancelled": Cond.State.CONDITION_FAILED,
        }
        completed = Cond(
            type_="Completed",
            state=done.get(self.state, Cond.State.CONDITION_PENDING),
            message=self.message,
        )
        reason = self.reason
        if self.live and self.cancel_requested:
            # [condition.proto] CANCELLING: "in the process of being cancelled".
            reason = Cond.ExecutionReason.CANCELLING
        if isinstance(reason, Cond.ExecutionReason):
            completed.execution_reason = reason
        elif isinstance(reason, Cond.CommonReason):
            completed.reason = reason
        conditions.append(completed)
        ex = run_v2.Execution(
            name=self.name,
            uid=str(uuid.uuid5(uuid.NAMESPACE_URL, self.name)),  # [execution.proto] a UUID4
            job=self.job.rsplit("/", 1)[-1],
            task_count=1,
            parallelism=1,
            template=self.template,
            launch_stage=self.launch_stage,
            conditions=conditions,
            reconciling=self.live,
            # [execution.proto]: counts of tasks in each phase; retried_count is "the number of
            # tasks which have retried at least once" (0 or 1 here), not a count of retries.
            running_count=int(self.state == "running"),
            succeeded_count=int(self.state == "succeeded"),
            failed_count=int(self.state == "failed"),
            cancelled_count=int(self.state == "cancelled"),
            retried_count=int(self.attempt > 0),
            log_uri=f"http://fake-cloudrun.invalid/logs/{self.short}",
            create_time=self.create_time,
        )
        if self.start_time:
            ex.start_time = self.start_time
        if self.completion_time:
            ex.completion_time = self.completion_time
        return ex


def exit_text(code: int) -> str:
    status = 128 - code if code < 0 else code  # a death by signal N reads as 128 + N
    return f"The container exited with a non-zero status of {status}."
