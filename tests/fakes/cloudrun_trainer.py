"""How the fake Cloud Run (tests/fakes/cloudrun.py) plays a scripted execution, and how it runs
a real trainer as a task's container would (with a `trainer_command`): the Job's args and env as
RunJob overrode them, Cloud Run's own variables, the task timeout, and a fresh attempt after each
failed one."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.fakes import cloudrun_rules as rules
from tests.fakes.cloudrun_execution import TIMEOUT_MESSAGE, Cond, FakeExecution, Outcome, exit_text

if TYPE_CHECKING:
    from tests.fakes.cloudrun import FakeCloudRun


def environ(fake: FakeCloudRun, ex: FakeExecution) -> dict[str, str]:
    # A container has none of the api's own settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
    env.update(fake.extra_env)
    for var in ex.template.containers[0].env:
        if not var.value_source.secret_key_ref.secret:
            env[var.name] = var.value
    # https://cloud.google.com/run/docs/container-contract#jobs-env-vars: the job, the
    # execution, the task's index and count, and CLOUD_RUN_TASK_ATTEMPT, the number of
    # times this task has been retried (0 on the first attempt).
    env.update(
        CLOUD_RUN_JOB=ex.job.rsplit("/", 1)[-1],
        CLOUD_RUN_EXECUTION=ex.short,
        CLOUD_RUN_TASK_INDEX="0",
        CLOUD_RUN_TASK_COUNT="1",
        CLOUD_RUN_TASK_ATTEMPT=str(ex.attempt),
    )
    return env


def wait_pending(fake: FakeCloudRun, outcome: Outcome) -> bool:
    """Wait out `pending` (or until the test lets it go); True when the fake was stopped
    meanwhile, so that a long pending wait never outlives the fake."""
    end = time.monotonic() + outcome.pending_s
    while time.monotonic() < end:
        if outcome.leave_pending is not None and outcome.leave_pending.is_set():
            break
        if fake.stopping.wait(0.02):
            break
    return fake.stopping.is_set()


def play_trainer(fake: FakeCloudRun, ex: FakeExecution, outcome: Outcome) -> None:
    assert fake.trainer_command is not None
    if wait_pending(fake, outcome):
        return
    timeout = rules.timeout_seconds(ex.template)
    while True:
        if ex.cancel_requested or not ex.live:
            return fake.cancelled(ex)
        log_path = (fake.log_dir or Path("/tmp")) / f"{ex.short}.attempt{ex.attempt}.log"
        args = list(ex.template.containers[0].args)
        if fake.container_tmp is not None:
            tmp = fake.container_tmp / f"{ex.short}-{ex.attempt}"
            scratch = "/tmp/tuneplane/"
            args = [str(tmp / a[len(scratch) :]) if a.startswith(scratch) else a for a in args]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [*fake.trainer_command, *args, *fake.extra_args],
                env=environ(fake, ex),
                cwd=fake.cwd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        with fake.lock:
            ex.process = proc
            ex.logs.append(log_path)
        fake.set_state(ex, "running")
        try:
            code = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code, timed_out = proc.wait(), True
        if fake.stopping.is_set():
            return
        if not fake.attempt_ended(ex, code, timed_out):
            return


def play_script(fake: FakeCloudRun, ex: FakeExecution, outcome: Outcome) -> None:
    if wait_pending(fake, outcome):
        return
    while True:
        if ex.cancel_requested or not ex.live:
            return fake.cancelled(ex)
        fake.set_state(ex, "running")
        end = outcome.end_of(ex.attempt)
        deadline = time.monotonic() + outcome.running_s
        while time.monotonic() < deadline or end == "hang":
            if ex.cancel_requested:
                return fake.cancelled(ex)
            if fake.stopping.is_set():
                return
            time.sleep(0.02)
        code = 0 if end == "succeed" else outcome.exit_code
        if not fake.attempt_ended(ex, code, timed_out=end == "timeout"):
            return


def attempt_ended(fake: FakeCloudRun, ex: FakeExecution, code: int, timed_out: bool) -> bool:
    """One attempt's container exited with `code`: the task succeeds, is retried (while
    `max_retries` allows: [task_template.proto] "Number of retries allowed per Task, before
    marking this Task failed"), or fails. True when another attempt follows."""
    if ex.cancel_requested:
        fake.cancelled(ex)
        return False
    if code == 0:
        fake.set_state(ex, "succeeded", "Execution completed successfully.")
        return False
    if ex.attempt < ex.max_retries:
        with fake.lock:
            ex.attempt += 1
        fake.set_state(ex, "retrying")
        return True
    message = f"Task {ex.short}-task0 failed with message: " + (
        TIMEOUT_MESSAGE if timed_out else exit_text(code)
    )
    # [condition.proto] NON_ZERO_EXIT_CODE: "A task reached its retry limit and the last
    # attempt failed due to the user container exiting with a non-zero exit code."
    fake.set_state(ex, "failed", message, Cond.ExecutionReason.NON_ZERO_EXIT_CODE)
    return False
