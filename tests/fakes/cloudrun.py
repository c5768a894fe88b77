"""A fake Cloud Run Admin API v2 (Jobs, Executions, google.longrunning.Operations) over real gRPC.

The client packages ship no servicers, so the services are built from gRPC's generic method
handlers and the request/response types of `google.cloud.run_v2`. It keeps Jobs, plays each
execution forward (pending -> running -> succeeded / failed / cancelled) like the platform does,
records every request and answers an injected error on demand.

An execution either follows a script (`next_outcome(...)`, for dispatcher tests) or, when the
fake has a `trainer_command`, runs that command locally as the task's container would: with the
Job's args and environment as overridden by RunJob, Cloud Run's own `CLOUD_RUN_*` variables,
the task timeout and the Job's retries (a killed or failed attempt is started again with
`CLOUD_RUN_TASK_ATTEMPT` one higher).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import grpc
from google.cloud import run_v2
from google.longrunning import operations_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from tests.fakes.grpcfake import FakeGrpcServer

Cond = run_v2.Condition
GPU_MINIMUMS = {"nvidia-l4": (4, 16), "nvidia-rtx-pro-6000": (20, 80)}  # vCPU, GiB
CANCEL_GRACE_SECONDS = 10.0


@dataclass
class Outcome:
    """How a scripted execution plays: how long it stays pending and running, and how it ends
    ("hang" keeps it running until it is cancelled)."""

    end: Literal["succeed", "fail", "timeout", "hang"] = "succeed"
    pending_s: float = 0.05
    running_s: float = 0.2
    exit_code: int = 1
    # Set by the test to end `pending` at once: a test that asserts "still pending" holds the
    # execution there with a long pending_s and lets it go with this, not with a short delay.
    leave_pending: threading.Event | None = None


@dataclass
class FakeExecution:
    name: str
    job: str
    template: run_v2.TaskTemplate
    operation: str
    max_retries: int
    create_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    start_time: datetime | None = None
    completion_time: datetime | None = None
    state: Literal["pending", "running", "succeeded", "failed", "cancelled"] = "pending"
    message: str = ""
    reason: Any = None
    attempt: int = 0
    retried: int = 0
    cancel_requested: bool = False
    process: subprocess.Popen[bytes] | None = None
    history: list[str] = field(default_factory=lambda: ["pending"])
    logs: list[Path] = field(default_factory=list)  # one per task attempt

    @property
    def short(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    def to_proto(self) -> run_v2.Execution:
        conditions = []
        if self.state in ("running", "succeeded", "failed", "cancelled") and self.start_time:
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
        if isinstance(self.reason, Cond.ExecutionReason):
            completed.execution_reason = self.reason
        elif isinstance(self.reason, Cond.CommonReason):
            completed.reason = self.reason
        conditions.append(completed)
        ex = run_v2.Execution(
            name=self.name,
            uid=self.short,
            job=self.job.rsplit("/", 1)[-1],
            task_count=1,
            parallelism=1,
            template=self.template,
            conditions=conditions,
            reconciling=self.state in ("pending", "running"),
            running_count=int(self.state == "running"),
            succeeded_count=int(self.state == "succeeded"),
            failed_count=int(self.state == "failed"),
            cancelled_count=int(self.state == "cancelled"),
            retried_count=self.retried,
            log_uri=f"http://fake-cloudrun.invalid/logs/{self.short}",
            create_time=self.create_time,
        )
        if self.start_time:
            ex.start_time = self.start_time
        if self.completion_time:
            ex.completion_time = self.completion_time
        return ex


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
        self._stopping = threading.Event()
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
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}"
            for p in self.execution(name).logs
        )

    def kill_task(self, name: str, sig: int = signal.SIGKILL) -> None:
        """What platform maintenance does to a GPU task: the container dies mid-run."""
        ex = self.execution(name)
        assert ex.process is not None, "only a running trainer process can be killed"
        os.killpg(ex.process.pid, sig)

    def stop(self) -> None:
        self._stopping.set()
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
        task = job.template.template
        if len(task.containers) != 1 or not task.containers[0].image:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.template.containers: image")
        limits = task.containers[0].resources.limits
        accelerator = task.node_selector.accelerator
        if accelerator:
            if accelerator not in GPU_MINIMUMS:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown GPU {accelerator}")
            if limits.get("nvidia.com/gpu") != "1":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a GPU needs nvidia.com/gpu: 1")
            cpu, mem = GPU_MINIMUMS[accelerator]
            if float(limits.get("cpu", "1")) < cpu or int(limits.get("memory", "0Gi")[:-2]) < mem:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{accelerator} needs at least {cpu} CPU and {mem}Gi memory",
                )

    def _create_job(
        self, req: run_v2.CreateJobRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        name = f"{req.parent}/jobs/{req.job_id}"
        self._validate(req.job, context)
        with self.lock:
            if name in self.jobs:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"Job {name} already exists")
            job = run_v2.Job(req.job)
            job.name, job.generation = name, 1
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
            job = run_v2.Job(req.job)
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
        template = run_v2.TaskTemplate(job.template.template)
        container = template.containers[0]
        for override in req.overrides.container_overrides:
            if override.name and override.name != container.name:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"no container named {override.name!r}"
                )
            if override.args or override.clear_args:
                container.args = list(override.args)
            env = {e.name: e for e in container.env}
            env.update({e.name: e for e in override.env})
            container.env = list(env.values())
        if req.overrides.timeout:
            template.timeout = req.overrides.timeout
        short = f"{req.name.rsplit('/', 1)[-1]}-{uuid.uuid4().hex[:5]}"
        operation = operations_pb2.Operation(
            name=f"{req.name.split('/jobs/')[0]}/operations/{uuid.uuid4()}"
        )
        ex = FakeExecution(
            name=f"{req.name}/executions/{short}",
            job=req.name,
            template=template,
            operation=operation.name,
            max_retries=template.max_retries,
        )
        operation.metadata.CopyFrom(_pack(ex.to_proto()))
        with self.lock:
            self.executions[ex.name] = ex
            self.operations[operation.name] = operation
            outcome = self.outcomes.popleft() if self.outcomes else self.default_outcome
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
            found = [e for e in self.executions.values() if e.job == req.parent]
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
            if ex.state in ("succeeded", "failed", "cancelled"):
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"Execution {ex.short} already finished"
                )
            ex.cancel_requested = True
            proc = ex.process
            operation = self.operations[ex.operation]
        if proc is not None and proc.poll() is None:
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

    def _set(self, ex: FakeExecution, state: str, message: str = "", reason: Any = None) -> None:
        with self.lock:
            ex.state = state  # type: ignore[assignment]
            ex.message, ex.reason = message, reason
            ex.history.append(state)
            now = datetime.now(UTC)
            if state == "running" and ex.start_time is None:
                ex.start_time = now
            if state in ("succeeded", "failed", "cancelled"):
                ex.completion_time = now
                operation = self.operations[ex.operation]
                operation.done = True
                if state == "succeeded":
                    operation.response.CopyFrom(_pack(ex.to_proto()))
                else:
                    operation.error.CopyFrom(status_pb2.Status(code=2, message=message))

    def _pending(self, outcome: Outcome) -> bool:
        """Wait out `pending`; True when the fake was stopped meanwhile."""
        end = time.monotonic() + outcome.pending_s
        while time.monotonic() < end:
            if outcome.leave_pending is not None and outcome.leave_pending.is_set():
                break
            if self._stopping.wait(0.02):
                break
        return self._stopping.is_set()

    def _cancelled(self, ex: FakeExecution) -> None:
        self._set(ex, "cancelled", "The execution was cancelled.", Cond.ExecutionReason.CANCELLED)

    def _play_script(self, ex: FakeExecution, outcome: Outcome) -> None:
        if self._pending(outcome):
            return
        if ex.cancel_requested:
            return self._cancelled(ex)
        self._set(ex, "running")
        end = time.monotonic() + outcome.running_s
        while time.monotonic() < end or outcome.end == "hang":
            if ex.cancel_requested:
                return self._cancelled(ex)
            if self._stopping.is_set():
                return
            time.sleep(0.02)
        if outcome.end == "succeed":
            self._set(ex, "succeeded", "Execution completed successfully.")
        elif outcome.end == "timeout":
            self._set(
                ex,
                "failed",
                f"Task {ex.short}-task0 failed with message: The configured timeout was reached.",
                Cond.ExecutionReason.NON_ZERO_EXIT_CODE,
            )
        else:
            message = _exit_message(ex, outcome.exit_code)
            self._set(ex, "failed", message, Cond.ExecutionReason.NON_ZERO_EXIT_CODE)

    def _environ(self, ex: FakeExecution) -> dict[str, str]:
        # A container has none of the api's own settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
        env.update(self.extra_env)
        for var in ex.template.containers[0].env:
            if not var.value_source.secret_key_ref.secret:
                env[var.name] = var.value
        env.update(
            CLOUD_RUN_JOB=ex.job.rsplit("/", 1)[-1],
            CLOUD_RUN_EXECUTION=ex.short,
            CLOUD_RUN_TASK_INDEX="0",
            CLOUD_RUN_TASK_COUNT="1",
            CLOUD_RUN_TASK_ATTEMPT=str(ex.attempt),
        )
        return env

    def _play_trainer(self, ex: FakeExecution, outcome: Outcome) -> None:
        assert self.trainer_command is not None
        if self._pending(outcome):
            return
        timeout = ex.template.timeout.total_seconds() if ex.template.timeout else 600.0
        while True:
            if ex.cancel_requested:
                return self._cancelled(ex)
            log_path = (self.log_dir or Path("/tmp")) / f"{ex.short}.attempt{ex.attempt}.log"
            args = list(ex.template.containers[0].args)
            if self.container_tmp is not None:
                tmp = self.container_tmp / f"{ex.short}-{ex.attempt}"
                scratch = "/tmp/tuneplane/"
                args = [str(tmp / a[len(scratch) :]) if a.startswith(scratch) else a for a in args]
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(
                    [*self.trainer_command, *args, *self.extra_args],
                    env=self._environ(ex),
                    cwd=self.cwd,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            with self.lock:
                ex.process = proc
                ex.logs.append(log_path)
            if ex.state != "running":
                self._set(ex, "running")
            try:
                code = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code, timed_out = proc.wait(), True
            if self._stopping.is_set():
                return
            if ex.cancel_requested:
                return self._cancelled(ex)
            if code == 0:
                return self._set(ex, "succeeded", "Execution completed successfully.")
            if ex.attempt < ex.max_retries:
                with self.lock:
                    ex.attempt += 1
                    ex.retried += 1
                continue
            message = (
                f"Task {ex.short}-task0 failed with message: The configured timeout was reached."
                if timed_out
                else _exit_message(ex, code)
            )
            return self._set(ex, "failed", message, Cond.ExecutionReason.NON_ZERO_EXIT_CODE)


def _exit_message(ex: FakeExecution, code: int) -> str:
    status = 128 - code if code < 0 else code  # a death by signal N reads as 128 + N
    return (
        f"Task {ex.short}-task0 failed with message: The container exited with a non-zero "
        f"status of {status}."
    )
