"""CloudRunDispatcher: each run segment is one execution of the trainer's Cloud Run Job.

`start` keeps the Job in sync with settings (created or updated only when its template changed),
then calls `run_job` with the run's overrides and returns the execution's name from the
operation's metadata at once: the RunJob operation ends only when the execution ends, so nothing
here ever waits on it. `status` reads the execution's conditions; `cancel` goes through the
Executions API.

Errors become `DispatchError`s the worker acts on: UNAVAILABLE / DEADLINE_EXCEEDED / INTERNAL
are retried here with backoff inside a small time budget, then reported `transient`;
RESOURCE_EXHAUSTED is `quota` (no GPU free: stock-out or quota) and PERMISSION_DENIED is `iam`
(roles granted a minute ago take minutes to apply): the run stays queued and is tried again for
`cloud_run_wait_seconds`; NOT_FOUND / INVALID_ARGUMENT and the rest are `permanent`, with a
message that says what to fix.

Idempotence across api crashes: the worker marks a run before `start`; a run found marked is
`adopt`ed (the executions of its run and segment are looked up by their TUNEPLANE_RUN_ID and
TUNEPLANE_SEGMENT) instead of started again, and `live_executions` lets the worker's sweep cancel
any execution that serves no run as its recorded one.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import grpc
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import run_v2
from google.cloud.run_v2.services.executions.transports import ExecutionsGrpcTransport
from google.cloud.run_v2.services.jobs.transports import JobsGrpcTransport

from api.config import Settings
from api.dispatch import cloudrun_job as cj
from api.dispatch.base import DispatchError, Execution, ExecutionStatus, Found, Launch
from api.dispatch.cloudrun_status import (
    TRANSIENT,
    describe,
    dispatch_error,
    env_of,
    execution_status,
    is_live,
    is_ours,
)
from trainer.contract.execution import PREFIX, ExecutionEnv

log = logging.getLogger(__name__)
T = TypeVar("T")

RPC_TIMEOUT = 30.0  # seconds per call; the client library sets none by default
OPERATION_TIMEOUT = 120.0  # creating or updating a Job takes seconds
# After these, a RunJob call may have started an execution although the answer never came.
AMBIGUOUS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}
)
_Cond = run_v2.Condition


def make_clients(
    settings: Settings,
) -> tuple[run_v2.JobsClient, run_v2.ExecutionsClient]:
    """Real clients; over a plaintext channel when `cloud_run_endpoint` names a local server."""
    if settings.cloud_run_endpoint:
        channel = grpc.insecure_channel(settings.cloud_run_endpoint)
        anonymous = AnonymousCredentials()
        return (
            run_v2.JobsClient(transport=JobsGrpcTransport(channel=channel, credentials=anonymous)),
            run_v2.ExecutionsClient(
                transport=ExecutionsGrpcTransport(channel=channel, credentials=anonymous)
            ),
        )
    return run_v2.JobsClient(), run_v2.ExecutionsClient()


class CloudRunDispatcher:
    def __init__(
        self,
        settings: Settings,
        *,
        retry_budget_seconds: float = 20.0,
        first_backoff_seconds: float = 0.5,
    ) -> None:
        cj.check_settings(settings)
        self.settings = settings
        self.retry_budget = retry_budget_seconds
        self.first_backoff = first_backoff_seconds
        self.jobs, self.executions = make_clients(settings)
        self._synced: set[str] = set()
        self._sync_lock = threading.Lock()

    # -- Dispatcher ------------------------------------------------------------------------

    def start(self, launch: Launch) -> Execution:
        gpu = launch.spec.gpu_type
        job = self.ensure_job(gpu)
        prefix = cj.run_prefix(self.settings, launch.run_id)
        env = launch.env.model_copy(
            update={
                "run_id": launch.run_id,
                "artifact_uri": prefix,
                "checkpoint_uri": f"{prefix}/checkpoints",
            }
        )
        if self.settings.callback_auth == "oidc":
            # Overrides are readable by every project viewer (`run.executions.get`); in this
            # mode the trainer proves itself with its service account's ID token instead.
            env = env.model_copy(update={"callback_token": None})
        sent_at = datetime.now(UTC)
        request = run_v2.RunJobRequest(
            name=job, overrides=cj.build_overrides(launch.spec, self.settings, env, sent_at)
        )
        try:
            execution = self._run_job(job, request, gpu, env, sent_at)
        except DispatchError as err:
            if not isinstance(err.__cause__, gexc.NotFound):
                raise
            # The Job was deleted behind our back: make it again, once.
            self._synced.discard(job)
            self.ensure_job(gpu)
            execution = self._run_job(job, request, gpu, env, sent_at)
        return Execution(
            name=execution.name,
            log_uri=execution.log_uri or None,
            artifact_uri=prefix,
            checkpoint_uri=f"{prefix}/checkpoints",
        )

    def _run_job(
        self,
        job: str,
        request: run_v2.RunJobRequest,
        gpu: str,
        env: ExecutionEnv,
        sent_at: datetime,
    ) -> run_v2.Execution:
        def adopt() -> run_v2.Execution | None:
            return self._find_started(job, env, since=sent_at)

        try:
            operation = self._call(
                f"start an execution of {job}",
                lambda: self.jobs.run_job(request=request, timeout=RPC_TIMEOUT),
                gpu=gpu,
                adopt=adopt,
            )
        except _Adopted as found:
            return found.execution
        # Never `operation.result()`: it ends only when the execution does.
        execution: run_v2.Execution | None = operation.metadata
        if execution is None or not execution.name:
            execution = adopt()
            if execution is None:
                raise DispatchError(
                    "transient",
                    f"Cloud Run started {job} but its answer named no execution "
                    f"(operation {operation.operation.name}); will look again",
                )
        return execution

    def cancel(self, execution_name: str) -> None:
        try:
            # Returns an operation that ends with the execution; nothing to wait for.
            self._call(
                f"cancel {execution_name}",
                lambda: self.executions.cancel_execution(name=execution_name, timeout=RPC_TIMEOUT),
            )
        except DispatchError as err:
            cause = err.__cause__
            if isinstance(cause, gexc.NotFound | gexc.FailedPrecondition):
                log.info("cancel %s: nothing to cancel (%s)", execution_name, cause.message)
                return
            raise

    def status(self, execution_name: str) -> ExecutionStatus:
        try:
            execution = self._call(
                f"read {execution_name}",
                lambda: self.executions.get_execution(name=execution_name, timeout=RPC_TIMEOUT),
                # The reconciler asks again next round; it must not stall on one execution.
                budget=min(self.retry_budget, 3.0),
            )
        except DispatchError as err:
            if isinstance(err.__cause__, gexc.NotFound):
                return ExecutionStatus(
                    "failed", f"Cloud Run has no execution {execution_name} (deleted?)"
                )
            # Not knowing is not failing: the reconciler asks again next round.
            return ExecutionStatus("unknown", err.message)
        return execution_status(execution)

    def adopt(self, launch: Launch, since: datetime) -> Execution | None:
        """An execution of this run and segment started since `since` that nobody recorded (the
        api died between `run_job` and recording it): the newest live one is returned, any other
        live one cancelled. None when there is none (then the caller starts one)."""
        job = self.ensure_job(launch.spec.gpu_type)
        found = [
            e
            for e in self._ours(job)
            if env_of(e).get(PREFIX + "RUN_ID") == launch.run_id
            and env_of(e).get(PREFIX + "SEGMENT") == str(launch.env.segment)
            and e.create_time >= since - timedelta(minutes=1)
            and is_live(e)
        ]
        if not found:
            return None
        found.sort(key=lambda e: e.create_time, reverse=True)
        for extra in found[1:]:
            log.warning(
                "%s: cancelling %s, a second execution of one segment", launch.run_id, extra.name
            )
            self.cancel(extra.name)
        prefix = cj.run_prefix(self.settings, launch.run_id)
        return Execution(
            name=found[0].name,
            log_uri=found[0].log_uri or None,
            artifact_uri=prefix,
            checkpoint_uri=f"{prefix}/checkpoints",
        )

    def live_executions(self) -> list[Found]:
        """Every live execution of our Jobs that names a run (for the orphan sweep)."""
        out = []
        for e in self._ours(f"{cj.location(self.settings)}/jobs/-"):
            env = env_of(e)
            run_id = env.get(PREFIX + "RUN_ID")
            if run_id and is_live(e) and is_ours(self.settings, e.name):
                out.append(Found(e.name, run_id, int(env.get(PREFIX + "SEGMENT", "0") or 0)))
        return out

    def _ours(self, parent: str) -> list[run_v2.Execution]:
        pager = self._call(
            f"list the executions of {parent}",
            lambda: self.executions.list_executions(
                request=run_v2.ListExecutionsRequest(parent=parent, page_size=100),
                timeout=RPC_TIMEOUT,
            ),
        )
        return list(itertools.islice(pager, 1000))

    def describe(self, execution_name: str) -> run_v2.Execution | None:
        """The execution as Cloud Run has it, or None when there is none (OIDC binding)."""
        try:
            return self._call(
                f"read {execution_name}",
                lambda: self.executions.get_execution(name=execution_name, timeout=RPC_TIMEOUT),
                budget=min(self.retry_budget, 3.0),
            )
        except DispatchError as err:
            if isinstance(err.__cause__, gexc.NotFound):
                return None
            raise

    def close(self) -> None:
        for client in (self.jobs, self.executions):
            client.transport.close()

    # -- the Job -----------------------------------------------------------------------------

    def ensure_job(self, gpu_type: str) -> str:
        """Create or update the Job of this GPU type when its template differs from settings;
        once per process (settings do not change while it runs)."""
        name = cj.job_name(self.settings, gpu_type)
        with self._sync_lock:
            if name in self._synced:
                return name
            desired = cj.build_job(self.settings, gpu_type)
            try:
                live = self._call(
                    f"read the Job {name}",
                    lambda: self.jobs.get_job(name=name, timeout=RPC_TIMEOUT),
                    gpu=gpu_type,
                )
            except DispatchError as err:
                if not isinstance(err.__cause__, gexc.NotFound):
                    raise
                live = None
            if live is None:
                log.info("creating the Cloud Run Job %s", name)
                self._wait(
                    f"create the Job {name}",
                    lambda: self.jobs.create_job(
                        parent=cj.location(self.settings),
                        job=desired,
                        job_id=cj.job_id(self.settings, gpu_type),
                        timeout=RPC_TIMEOUT,
                    ),
                    gpu_type,
                )
            elif not cj.same_template(live, desired):
                log.info("updating the Cloud Run Job %s: its template differs from settings", name)
                desired.name = name
                self._wait(
                    f"update the Job {name}",
                    lambda: self.jobs.update_job(job=desired, timeout=RPC_TIMEOUT),
                    gpu_type,
                )
            self._synced.add(name)
            return name

    def _wait(self, what: str, call: Callable[[], object], gpu: str) -> None:
        def run() -> object:
            operation = call()
            return operation.result(timeout=OPERATION_TIMEOUT)  # type: ignore[attr-defined]

        self._call(what, run, gpu=gpu)

    # -- helpers -----------------------------------------------------------------------------

    def _find_started(
        self, job: str, env: ExecutionEnv, since: datetime
    ) -> run_v2.Execution | None:
        """An execution this very launch started although RunJob's answer was lost: same run,
        segment and deadline in its environment, created after we asked."""
        want = {k: v for k, v in env.as_environ().items() if k in _IDENTITY}
        try:
            pager = self.executions.list_executions(
                request=run_v2.ListExecutionsRequest(parent=job, page_size=20),
                timeout=RPC_TIMEOUT,
            )
            # Newest first; a lost answer is seconds old, so the first page is enough.
            for execution in itertools.islice(pager, 20):
                created = execution.create_time
                if created and created < since - timedelta(minutes=1):
                    continue
                containers = execution.template.containers
                have = {e.name: e.value for e in containers[0].env} if containers else {}
                if all(have.get(k) == v for k, v in want.items()):
                    return execution
        except gexc.GoogleAPICallError as err:
            log.warning("could not list executions of %s: %s", job, err)
        return None

    def _call(
        self,
        what: str,
        fn: Callable[[], T],
        *,
        gpu: str | None = None,
        adopt: Callable[[], run_v2.Execution | None] | None = None,
        budget: float | None = None,
    ) -> T:
        deadline = time.monotonic() + (self.retry_budget if budget is None else budget)
        delay = self.first_backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except gexc.GoogleAPICallError as err:
                code = err.grpc_status_code
                if code in TRANSIENT:
                    if adopt is not None and code in AMBIGUOUS:
                        found = adopt()
                        if found is not None:
                            raise _Adopted(found) from err
                    pause = delay * (0.5 + random.random())
                    if time.monotonic() + pause < deadline:
                        log.warning("%s: %s; retrying in %.1fs", what, describe(err), pause)
                        time.sleep(pause)
                        delay *= 2
                        continue
                raise dispatch_error(self.settings, what, err, gpu, attempt) from err


# The variables that identify one launch (the deadline is new at every dispatch).
_IDENTITY = frozenset(PREFIX + n for n in ("RUN_ID", "SEGMENT", "DEADLINE"))


class _Adopted(Exception):
    def __init__(self, execution: run_v2.Execution) -> None:
        super().__init__(execution.name)
        self.execution = execution
