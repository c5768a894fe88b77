"""The dispatch worker: starts queued runs, finishes cancels, and notices executions that ended
without a word from their trainer.

One loop, every `worker_poll_seconds`:
1. cancels: a `cancelling` run's execution is asked to stop (again after `cancel_reask_seconds`
   if it has not), and once it has ended the run is `cancelled`;
   stops: the executions that must not go on (their run ended: `finish_run` queued the stop)
   are stopped the same way, once any exit grace is over (api/dispatch/stops.py);
2. dispatch: claim as many queued runs as `max_concurrency` leaves room for (a lease in the row,
   safe with several workers; api/dispatch/service.py), mint each a callback token, start it
   through the Dispatcher and record the execution at once;
3. every `reconcile_seconds`, the reconciler: asks the Dispatcher how each active run's
   execution is doing; one that ended while the run is still active never sent its final event,
   so the run moves on with the execution's own message. It keeps no state, so it works the
   same after an api restart.
It runs as a thread of the api (`settings.run_worker`) or alone (`tuneplane worker`). Errors of
one run or one tick are logged and never stop the loop: the next tick tries again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from pydantic import SecretStr, ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from api.auth.callback import mint_token, token_lifetime
from api.config import Settings
from api.db import session_scope, utcnow
from api.dispatch import make_dispatcher, service, stops
from api.dispatch.base import (
    ENDED,
    Dispatcher,
    DispatchError,
    Execution,
    ExecutionStatus,
    Launch,
    owned,
    segment_length,
)
from api.dispatch.shutdown import checkpoint_and_stop
from api.dispatch.sweep import Adopting, sweep_orphans
from api.errors import Problem
from api.events import service as events
from api.observability import metrics
from api.runs.states import RunStatus
from trainer.contract.events import parse_event
from trainer.contract.execution import ExecutionEnv
from trainer.contract.spec import RunSpec

log = logging.getLogger("tuneplane.worker")


@runtime_checkable
class LeftoverEvents(Protocol):
    """A dispatcher that can read what a finished trainer could not deliver (the local one:
    the trainer's spool is on this machine's disk)."""

    def leftover_events(self, execution_name: str) -> list[str]: ...

    def clear_leftover_events(self, execution_name: str) -> None: ...


class Worker:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        dispatcher: Dispatcher | None = None,
        *,
        worker_id: str | None = None,
        retry: service.RetryPolicy | None = None,
        cancel_reask_seconds: float = 30.0,
        exit_grace_seconds: float = 60.0,
        claim_batch: int = 8,
    ) -> None:
        self.settings, self.engine = settings, engine
        self._own_dispatcher = dispatcher is None
        self.dispatcher: Dispatcher = dispatcher or make_dispatcher(settings)
        self.worker_id = worker_id or (
            f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self.retry = retry or service.RetryPolicy(wait_seconds=settings.cloud_run_wait_seconds)
        self.cancel_reask_seconds = cancel_reask_seconds
        # A trainer exits within seconds of its final event: only one still running this long
        # after it is stopped (a hung upload, a platform retry started after the verdict).
        self.exit_grace_seconds = exit_grace_seconds
        self.claim_batch = claim_batch
        self._cancel_asked: dict[str, float] = {}
        self._last_reconcile = 0.0
        self._stop = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    # -- running -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run_forever, name="tuneplane-worker", daemon=True
        )
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to end after its current step (safe from a signal handler)."""
        self._stop.set()

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop, then have local trainers save a checkpoint and stop, unless
        settings.local_trainers_on_stop says keep (api/dispatch/shutdown.py). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the worker did not stop within %ss", timeout)
        if self.settings.local_trainers_on_stop == "checkpoint":
            checkpoint_and_stop(
                self.engine, self.dispatcher, self._take_leftover_events, self.settings
            )
        try:
            with session_scope(self.engine) as session:
                service.release_claims(session, self.worker_id)
        except Exception:
            log.exception("could not release the worker's claims (they expire by themselves)")
        if self._own_dispatcher:
            self.dispatcher.close()

    def run_forever(self) -> None:
        log.info("worker %s started", self.worker_id)
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.settings.worker_poll_seconds)
        log.info("worker %s stopped", self.worker_id)

    def tick(self) -> None:
        """One pass of the loop; each step's errors are logged, not raised."""
        for step in (self.finish_cancels, self.stop_executions, self._dispatch_all):
            try:
                step()
            except Exception:
                log.exception("worker step %s failed; trying again next tick", step.__name__)
        if time.monotonic() - self._last_reconcile >= self.settings.reconcile_seconds:
            self._last_reconcile = time.monotonic()
            for check in (self.reconcile, self.sweep_orphans):
                try:
                    check()
                    if check == self.reconcile:
                        metrics.reconciled()
                except Exception:
                    log.exception("%s failed; trying again next time", check.__name__)

    def stop_executions(self) -> int:
        """Carry out the due stops of executions (api/dispatch/stops.py); returns how many."""
        return stops.stop_due(
            self.engine,
            self.dispatcher,
            exit_grace=timedelta(seconds=self.exit_grace_seconds),
            reask=timedelta(seconds=self.cancel_reask_seconds),
        )

    def sweep_orphans(self) -> None:
        sweep_orphans(self.engine, self.dispatcher, self._cancel)

    # -- dispatch ------------------------------------------------------------------------------

    def _dispatch_all(self) -> None:
        # Full batches mean there may be more waiting: go on without waiting for the next tick.
        while self.dispatch_ready() >= self.claim_batch and not self._stop.is_set():
            pass

    def dispatch_ready(self) -> int:
        """Claim and start what there is room for; returns how many executions started."""
        with session_scope(self.engine) as session:
            claimed = service.claim_runs(
                session,
                self.worker_id,
                max_concurrency=self.settings.max_concurrency,
                lease_seconds=self.settings.claim_lease_seconds,
                batch=self.claim_batch,
            )
        started = 0
        for run_id in claimed:
            if self._stop.is_set():
                break  # stop() gives the rest back
            try:
                started += self._dispatch(run_id)
            except Exception:
                log.exception("dispatching %s failed; its claim expires and it is retried", run_id)
        return started

    def _dispatch(self, run_id: str) -> int:
        with session_scope(self.engine) as session:
            run = service.renew_claim(
                session, run_id, self.worker_id, self.settings.claim_lease_seconds
            )
            if run is None:
                return 0
            segment, raw_spec, launched_at = run.segment, run.spec, run.launched_at
        try:
            launch = self._launch(run_id, segment, raw_spec)
        except ValidationError as exc:
            # A stored spec that no longer parses (the spec model changed): nothing will fix it.
            self._failed(run_id, DispatchError("permanent", f"the stored spec is invalid: {exc}"))
            return 0
        try:
            execution = self._adopt(launch, launched_at) or self._start(run_id, launch)
        except DispatchError as exc:
            self._failed(run_id, exc)
            return 0
        except Exception as exc:
            log.exception("the dispatcher raised while starting %s", run_id)
            self._failed(run_id, DispatchError("transient", f"unexpected error: {exc!r}"))
            return 0
        try:
            ours = self._record(run_id, execution)
        except Exception:
            # Unrecorded, the execution would run unseen and the run be started again when its
            # claim expires: stop it instead, and let the claim expire.
            log.exception("recording %s for %s failed; stopping it", execution.name, run_id)
            self._cancel(execution.name)
            return 0
        if not ours:
            log.info("%s was cancelled while %s started; stopping it", run_id, execution.name)
            self.stop_executions()  # its stop was queued with the record
            return 0
        log.info(
            "%s segment %d started as %s",
            run_id,
            segment,
            execution.name,
            extra={"run_id": run_id, "execution": execution.name},
        )
        return 1

    def _adopt(self, launch: Launch, launched_at: datetime | None) -> Execution | None:
        """A run marked as launched may have an execution a crashed worker never recorded."""
        if launched_at is None or not isinstance(self.dispatcher, Adopting):
            return None
        found = self.dispatcher.adopt(launch, launched_at)
        if found is not None:
            log.warning("%s: adopting %s, started before a crash", launch.run_id, found.name)
        return found

    def _start(self, run_id: str, launch: Launch) -> Execution:
        # The marker goes in first (committed): a crash after `run_job` leaves it behind.
        with session_scope(self.engine) as session:
            if not service.mark_launch(session, run_id, self.worker_id):
                raise DispatchError("transient", "the run stopped being ours before it started")
        started = time.perf_counter()
        execution = self.dispatcher.start(launch)
        metrics.DISPATCH_SECONDS.labels(self.settings.dispatcher).observe(
            time.perf_counter() - started
        )
        return execution

    def _record(self, run_id: str, execution: Execution, attempts: int = 3) -> bool:
        for attempt in range(1, attempts + 1):
            try:
                with session_scope(self.engine) as session:
                    return service.record_execution(session, run_id, self.worker_id, execution)
            except OperationalError:  # the database blinked (restart, failover, lock timeout)
                if attempt == attempts:
                    raise
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _launch(self, run_id: str, segment: int, raw_spec: dict[str, object]) -> Launch:
        spec = RunSpec.model_validate(raw_spec)
        now = utcnow()
        expires = now + token_lifetime(self.settings, spec.time_budget_minutes)
        env = ExecutionEnv(
            run_id=run_id,
            callback_url=f"{self.settings.public_url.rstrip('/')}/api/v1/runs/{run_id}/events",
            callback_token=SecretStr(mint_token(self.settings.signing_key, run_id, expires)),
            deadline=now + segment_length(self.settings, spec),
            segment=segment,
            segment_max_steps=self.settings.segment_max_steps,
        )
        return Launch(run_id=run_id, spec=spec, env=env)

    def _failed(self, run_id: str, error: DispatchError) -> None:
        metrics.DISPATCH_ERRORS.labels(error.kind).inc()
        log.warning(
            "starting %s failed (%s): %s",
            run_id,
            error.kind,
            error.message,
            extra={"run_id": run_id},
        )
        with session_scope(self.engine) as session:
            service.dispatch_failed(session, run_id, self.worker_id, error, self.retry)

    # -- cancels -------------------------------------------------------------------------------

    def finish_cancels(self) -> None:
        with session_scope(self.engine) as session:
            rows = service.runs_with_executions(session, (RunStatus.cancelling,))
        # Another replica's execution is that replica's to stop (api/dispatch/local.py).
        rows = [(r, n) for r, n in rows if n is None or owned(self.dispatcher, n)]
        for run_id, name in rows:
            try:
                self._finish_cancel(run_id, name)
            except Exception:
                log.exception("finishing the cancel of %s failed; trying again", run_id)
        live = {name for _, name in rows}
        self._cancel_asked = {k: v for k, v in self._cancel_asked.items() if k in live}

    def _finish_cancel(self, run_id: str, name: str | None) -> None:
        if name is None:
            with session_scope(self.engine) as session:
                service.finish_cancel_without_execution(session, run_id)
            return
        status = self.dispatcher.status(name)
        if status.state in ENDED:
            self._conclude(run_id, name, status)
            return
        asked = self._cancel_asked.get(name)
        if asked is None or time.monotonic() - asked >= self.cancel_reask_seconds:
            self._cancel(name)

    def _cancel(self, name: str) -> None:
        self._cancel_asked[name] = time.monotonic()
        try:
            self.dispatcher.cancel(name)
        except DispatchError as exc:
            log.warning("cancelling %s failed (%s): %s; asking again later", name, exc.kind, exc)

    # -- reconciler ------------------------------------------------------------------------------

    def reconcile(self) -> None:
        with session_scope(self.engine) as session:
            rows = service.runs_with_executions(session, (RunStatus.dispatched, RunStatus.running))
        for run_id, name in rows:
            if name is None or not owned(self.dispatcher, name):
                continue  # not started yet, or another replica's to judge
            try:
                status = self.dispatcher.status(name)
                if status.state in ENDED:
                    self._conclude(run_id, name, status)
            except Exception:
                log.exception("checking %s (%s) failed; trying again later", run_id, name)

    def _conclude(self, run_id: str, name: str, status: ExecutionStatus) -> None:
        """The execution ended. Read what its trainer could not deliver first (that may be its
        final event), then move the run on if it is still waiting."""
        self._take_leftover_events(run_id, name)
        with session_scope(self.engine) as session:
            moved = service.execution_ended(session, run_id, name, status)
        if moved:
            log.warning(
                "%s: execution %s ended (%s); run %s",
                *(run_id, name, status.state, moved),
                extra={"run_id": run_id, "execution": name},
            )

    def _take_leftover_events(self, run_id: str, name: str) -> None:
        if not isinstance(self.dispatcher, LeftoverEvents):
            return
        lines = self.dispatcher.leftover_events(name)
        if not lines:
            return
        taken = 0
        for line in lines:
            try:
                event = parse_event(line)
            except ValidationError:
                log.warning("%s: a spooled event is not valid and is skipped", run_id)
                continue
            try:
                with session_scope(self.engine) as session:
                    events.ingest(session, run_id, event)
                taken += 1
            except Problem as exc:
                log.warning("%s: a spooled event was refused: %s", run_id, exc.detail)
        log.info("%s: took %d events the trainer had spooled", run_id, taken)
        self.dispatcher.clear_leftover_events(name)
