"""A fake Cloud Run Admin API v2 (Jobs, Executions, google.longrunning.Operations) over real gRPC,
built from gRPC's generic handlers and `google.cloud.run_v2`'s own types (the client packages ship
no servicers). It keeps Jobs, records every request, answers an injected error on demand, and
plays executions forward: by a script (`next_outcome`), by running a real trainer as the task's
container (`trainer_command`; tests/fakes/cloudrun_trainer.py), or only when the test says so
(`Outcome("manual")`, `start_attempt`, `end_attempt`: no clock decides). Every Job and RunJob
passes the documented rules of tests/fakes/cloudrun_rules.py first, and counts and conditions
read as execution.proto defines them (tests/fakes/cloudrun_execution.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.cloud import run_v2
from google.longrunning import operations_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from tests.fakes import cloudrun_rules as rules
from tests.fakes.cloudrun_execution import (
    ENDED,
    FakeExecution,
    Outcome,
)
from tests.fakes.cloudrun_trainer import attempt_ended, play_script, play_trainer
from tests.fakes.grpcfake import FakeGrpcServer

Cond = run_v2.Condition
CANCEL_GRACE_SECONDS = 10.0
__all__ = ["ENDED", "FakeCloudRun", "FakeExecution", "Outcome"]


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(type(message).pb(message))
    return packed


class FakeCloudRun(FakeGrpcServer):
    def __init__(
        self,
        *,
        trainer_command: Sequence[str] | None = None,
        extra_env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
        log_dir: Path | None = None,
        cwd: Path | None = None,
        container_tmp: Path | None = None,
    ) -> None:
        super().__init__()
        self.trainer_command = list(trainer_command) if trainer_command else None
        # Each task attempt gets a fresh private scratch directory, as a new container does:
        # `/tmp/tuneplane/...` in its args becomes `container_tmp/<execution>-<attempt>/...`.
        self.container_tmp = container_tmp
        self.extra_env = dict(extra_env or {})
        # Appended after the Job's args (argparse: the last flag wins). The e2e tests pass
        # `--device cpu`: the dispatcher asks for `cuda`, and this machine's CPU stands in for it.
        self.extra_args = list(extra_args)
        self.log_dir = log_dir
        self.cwd = cwd
        self.jobs: dict[str, run_v2.Job] = {}
        self.executions: dict[str, FakeExecution] = {}
        self.operations: dict[str, operations_pb2.Operation] = {}
        self.outcomes: deque[Outcome] = deque()
        self.default_outcome = Outcome()
        self.asked_stage: dict[str, int] = {}
        # Called with each new execution before RunJob answers.
        self.after_run_job: Callable[[FakeExecution], None] | None = None
        self.stopping = threading.Event()
        rq = run_v2
        op = operations_pb2.Operation.SerializeToString
        self.add_service(
            "google.cloud.run.v2.Jobs",
            {
                "CreateJob": (self._create_job, rq.CreateJobRequest.deserialize, op),
                "GetJob": (self._get_job, rq.GetJobRequest.deserialize, rq.Job.serialize),
                "UpdateJob": (self._update_job, rq.UpdateJobRequest.deserialize, op),
                "RunJob": (self._run_job, rq.RunJobRequest.deserialize, op),
            },
        )
        self.add_service(
            "google.cloud.run.v2.Executions",
            {
                "GetExecution": (
                    self._get_execution,
                    rq.GetExecutionRequest.deserialize,
                    rq.Execution.serialize,
                ),
                "ListExecutions": (
                    self._list_executions,
                    rq.ListExecutionsRequest.deserialize,
                    rq.ListExecutionsResponse.serialize,
                ),
                "CancelExecution": (
                    self._cancel_execution,
                    rq.CancelExecutionRequest.deserialize,
                    op,
                ),
            },
        )
        self.add_service(
            "google.longrunning.Operations",
            {
                "GetOperation": (
                    self._get_operation,
                    operations_pb2.GetOperationRequest.FromString,
                    op,
                ),
                "WaitOperation": (
                    self._get_operation,
                    operations_pb2.WaitOperationRequest.FromString,
                    op,
                ),
            },
        )

    # -- test controls -----------------------------------------------------------------------

    def next_outcome(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def seed_execution(self, name: str, env: dict[str, str]) -> FakeExecution:
        """A live `manual` execution that exists as if some RunJob had started it (a test of a
        reader of executions needs no Job for it)."""
        variables = [run_v2.EnvVar(name=k, value=v) for k, v in env.items()]
        template = run_v2.TaskTemplate(containers=[run_v2.Container(image="i", env=variables)])
        operation = operations_pb2.Operation(name=f"{name}/operation")
        ex = FakeExecution(name, name.split("/executions/")[0], template, operation.name, 0)
        with self.lock:
            self.operations[operation.name] = operation
            self.executions[name] = ex
        return ex

    def execution(self, name: str) -> FakeExecution:
        with self.lock:
            return self.executions[name]

    def wait_for(self, name: str, *states: str, timeout: float = 120.0) -> FakeExecution:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ex = self.execution(name)
            if ex.state in states:
                return ex
            time.sleep(0.05)
        raise AssertionError(f"{name} is {self.execution(name).state}, not one of {states}")

    def log_text(self, name: str) -> str:
        """Every attempt's output, for assertion messages."""
        logs = self.execution(name).logs
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in logs)

    def kill_task(self, name: str, sig: int = signal.SIGKILL) -> None:
        """What platform maintenance does to a GPU task: the container dies mid-run."""
        ex = self.execution(name)
        assert ex.process is not None, "only a running trainer process can be killed"
        os.killpg(ex.process.pid, sig)

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            procs = [e.process for e in self.executions.values() if e.process]
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        super().stop()

    # -- Jobs -------------------------------------------------------------------------------

    def _done_operation(self, response: Any) -> operations_pb2.Operation:
        operation = operations_pb2.Operation(
            name=f"projects/p/locations/l/operations/{uuid.uuid4()}", done=True
        )
        operation.response.CopyFrom(_pack(response))
        with self.lock:
            self.operations[operation.name] = operation
        return operation

    def _validate(self, job: run_v2.Job, context: grpc.ServicerContext) -> None:
        try:
            rules.check_job(job)
        except rules.Rejected as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def _stored(self, job: run_v2.Job) -> run_v2.Job:
        stored = run_v2.Job(job)
        # What was asked for governs what later RunJob overrides may use; reads report the
        # least stable stage the template needs ([launch stage]).
        self.asked_stage[stored.name] = job.launch_stage
        stored.launch_stage = rules.output_stage(job)
        return stored

    def _create_job(
        self, req: run_v2.CreateJobRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        name = f"{req.parent}/jobs/{req.job_id}"
        self._validate(req.job, context)
        with self.lock:
            if name in self.jobs:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"Job {name} already exists")
            req.job.name = name
            job = self._stored(req.job)
            job.generation = 1
            self.jobs[name] = job
        return self._done_operation(job)

    def _get_job(self, req: run_v2.GetJobRequest, context: grpc.ServicerContext) -> run_v2.Job:
        with self.lock:
            job = self.jobs.get(req.name)
        if job is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Resource '{req.name}' was not found")
        return job

    def _update_job(
        self, req: run_v2.UpdateJobRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        self._validate(req.job, context)
        with self.lock:
            old = self.jobs.get(req.job.name)
            if old is None and not req.allow_missing:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Resource '{req.job.name}' not found")
            job = self._stored(req.job)
            job.generation = (old.generation if old else 0) + 1
            self.jobs[job.name] = job
        return self._done_operation(job)

    def _run_job(
        self, req: run_v2.RunJobRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        with self.lock:
            job = self.jobs.get(req.name)
        if job is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Resource '{req.name}' was not found")
        asked = run_v2.Job(job)
        asked.launch_stage = self.asked_stage.get(req.name, job.launch_stage)
        try:
            template = rules.apply_overrides(asked, req.overrides)
        except rules.Rejected as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        short = f"{req.name.rsplit('/', 1)[-1]}-{uuid.uuid4().hex[:5]}"
        operation = operations_pb2.Operation(
            name=f"{req.name.split('/jobs/')[0]}/operations/{uuid.uuid4()}"
        )
        ex = FakeExecution(
            name=f"{req.name}/executions/{short}",
            job=req.name,
            template=template,
            operation=operation.name,
            max_retries=rules.max_retries(template),
            launch_stage=job.launch_stage,
        )
        operation.metadata.CopyFrom(_pack(ex.to_proto()))
        with self.lock:
            self.executions[ex.name] = ex
            self.operations[operation.name] = operation
            outcome = self.outcomes.popleft() if self.outcomes else self.default_outcome
        if self.after_run_job is not None:
            self.after_run_job(ex)  # e.g. SIGKILL the api before it hears the answer
        if outcome.end == "manual":
            return operation
        target = self._play_trainer if self.trainer_command else self._play_script
        threading.Thread(target=target, args=(ex, outcome), daemon=True).start()
        return operation

    # -- Executions -------------------------------------------------------------------------

    def _get_execution(
        self, req: run_v2.GetExecutionRequest, context: grpc.ServicerContext
    ) -> run_v2.Execution:
        with self.lock:
            ex = self.executions.get(req.name)
            if ex is not None:
                return ex.to_proto()
        context.abort(grpc.StatusCode.NOT_FOUND, f"Resource '{req.name}' was not found")

    def _list_executions(
        self, req: run_v2.ListExecutionsRequest, context: grpc.ServicerContext
    ) -> run_v2.ListExecutionsResponse:
        with self.lock:
            # [execution.proto] "To list all Executions across Jobs, use "-" instead of Job name."
            across = req.parent.endswith("/jobs/-")
            prefix = req.parent[: -len("-")]
            found = [
                e
                for e in self.executions.values()
                if e.job == req.parent or (across and e.job.startswith(prefix))
            ]
            found.sort(key=lambda e: e.create_time, reverse=True)
            return run_v2.ListExecutionsResponse(
                executions=[e.to_proto() for e in found[: req.page_size or 100]]
            )

    def _cancel_execution(
        self, req: run_v2.CancelExecutionRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        with self.lock:
            ex = self.executions.get(req.name)
            if ex is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Resource '{req.name}' was not found")
            if not ex.live:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"Execution {ex.short} already finished"
                )
            ex.cancel_requested = True
            proc = ex.process
            operation = self.operations[ex.operation]
            # No task is running (still pending, or between attempts): nothing to stop, and no
            # further attempt starts.
            waiting = ex.state in ("pending", "retrying")
        if waiting:
            self.cancelled(ex)
        elif proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            threading.Thread(target=self._kill_after_grace, args=(proc,), daemon=True).start()
        return operation

    def _kill_after_grace(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=CANCEL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    def _get_operation(self, req: Any, context: grpc.ServicerContext) -> operations_pb2.Operation:
        with self.lock:
            operation = self.operations.get(req.name)
        if operation is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"operation {req.name} not found")
        return operation

    # -- playing executions forward -----------------------------------------------------------

    def set_state(
        self, ex: FakeExecution, state: str, message: str = "", reason: Any = None
    ) -> None:
        with self.lock:
            if not ex.live:
                return  # an ended execution never changes again
            ex.state = state  # type: ignore[assignment]
            ex.message, ex.reason = message, reason
            ex.history.append(state)
            now = datetime.now(UTC)
            if state == "running" and ex.start_time is None:
                ex.start_time = now
            if state in ENDED:
                ex.completion_time = now
                operation = self.operations[ex.operation]
                operation.done = True
                if state == "succeeded":
                    operation.response.CopyFrom(_pack(ex.to_proto()))
                else:
                    operation.error.CopyFrom(status_pb2.Status(code=2, message=message))

    def cancelled(self, ex: FakeExecution) -> None:
        self.set_state(
            ex, "cancelled", "The execution was cancelled.", Cond.ExecutionReason.CANCELLED
        )

    def attempt_ended(self, ex: FakeExecution, code: int, timed_out: bool = False) -> bool:
        return attempt_ended(self, ex, code, timed_out)

    # A test moves a `manual` execution itself: no clock decides anything.
    def start_attempt(self, name: str) -> FakeExecution:
        ex = self.execution(name)
        assert ex.state in ("pending", "retrying"), f"{ex.short} is {ex.state}"
        self.set_state(ex, "running")
        return ex

    def end_attempt(self, name: str, exit_code: int, *, timed_out: bool = False) -> FakeExecution:
        ex = self.execution(name)
        assert ex.state == "running", f"{ex.short} is {ex.state}"
        self.attempt_ended(ex, exit_code, timed_out)
        return ex

    def live_executions(self, run_id: str | None = None) -> list[FakeExecution]:
        with self.lock:
            return [
                e
                for e in self.executions.values()
                if e.live and (run_id is None or e.env().get("TUNEPLANE_RUN_ID") == run_id)
            ]

    def _play_script(self, ex: FakeExecution, outcome: Outcome) -> None:
        play_script(self, ex, outcome)

    def _play_trainer(self, ex: FakeExecution, outcome: Outcome) -> None:
        play_trainer(self, ex, outcome)
