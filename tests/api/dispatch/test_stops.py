"""A run that ends while its execution still runs gets that execution stopped: `finish_run`
queues the stop in the unit of work that ends the run, and the worker's drain carries it out
(api/dispatch/stops.py). Against real databases and the real LocalDispatcher running a stand-in
trainer process; the drain is driven step by step, never waited for."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update
from sqlmodel import select

from api.config import Settings
from api.db import session_scope, utcnow
from api.dispatch import service
from api.dispatch.base import DispatchError, Execution, ExecutionStatus
from api.dispatch.local import LocalDispatcher
from api.dispatch.models import ExecutionStop
from api.dispatch.worker import Worker
from api.events import service as events
from api.runs import service as runs
from api.runs.states import RunStatus
from tests.api.dispatch.test_local import (
    FAKE_TRAINER,
    HANG_GUARD_S,
    leave_nothing_running,
    wait_for,
    wait_started,
)
from tests.api.dispatch.test_worker import FakePlatform, load, make_worker
from tests.api.factories import insert_runs
from trainer.contract import events as ev


@pytest.fixture
def local_for(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[Callable[[str], LocalDispatcher]]:
    """A LocalDispatcher whose trainer is the stand-in script in `mode`; a fresh one for the
    same mode is what an api restarted after a crash would have."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    settings = make_settings()
    made: list[LocalDispatcher] = []

    def _make(mode: str) -> LocalDispatcher:
        d = LocalDispatcher(
            settings,
            trainer_command=[sys.executable, str(script), mode],
            grace_seconds=HANG_GUARD_S,
        )
        made.append(d)
        return d

    yield _make
    leave_nothing_running(made)


def stops_of(engine: Engine, run_id: str) -> list[ExecutionStop]:
    with session_scope(engine) as s:
        return list(s.exec(select(ExecutionStop).where(ExecutionStop.run_id == run_id)))


def dispatched(settings: Settings, engine: Engine, dispatcher: Any, **worker: Any) -> str:
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    assert Worker(settings, engine, dispatcher, **worker).dispatch_ready() == 1
    return run_id


def trainer_reports(engine: Engine, run_id: str, event: ev.Event) -> None:
    with session_scope(engine) as s:
        events.ingest(s, run_id, event)


def failed(run_id: str) -> ev.Event:
    return ev.FailedEvent(run_id=run_id, seq=1, data=ev.Failed(error="CUDA error"))


def test_a_trainer_still_running_after_its_run_failed_is_stopped_even_after_a_crash(
    settings: Settings, engine: Engine, local_for: Callable[[str], LocalDispatcher]
) -> None:
    before_crash = local_for("term")  # runs until SIGTERM, then exits 0
    run_id = dispatched(settings, engine, before_crash)
    name = load(engine, run_id).execution_name
    assert name is not None
    wait_started(before_crash, name)

    # The trainer reports `failed` but its process stays up (a hung upload, say).
    trainer_reports(engine, run_id, failed(run_id))
    assert load(engine, run_id).status == RunStatus.failed
    (stop,) = stops_of(engine, run_id)  # the intent was committed with the end
    assert (stop.execution_name, stop.status, stop.exits_by_itself) == (name, "pending", True)
    assert before_crash.status(name).state == "running"

    # The api dies before its worker drains: a new process finds the stop in the database.
    before_crash.close()
    after = local_for("term")
    worker = Worker(settings, engine, after, exit_grace_seconds=0, cancel_reask_seconds=0)
    assert worker.stop_executions() == 1  # SIGTERM
    assert wait_for(after, name).state == "cancelled"
    assert "SIGTERM" in (settings.logs_dir / f"{run_id}-0.log").read_text()
    assert stops_of(engine, run_id)[0].status == "pending"  # not seen ended yet

    assert worker.stop_executions() == 1  # now seen ended
    (stop,) = stops_of(engine, run_id)
    assert (stop.status, stop.ended_as, stop.last_error) == ("done", "cancelled", None)
    assert stop.cancel_asked_at is not None and stop.done_at is not None
    run = load(engine, run_id)
    assert run.execution_ended and run.status == RunStatus.failed  # the verdict stands
    assert run.status_reason == "the trainer failed: CUDA error"
    assert worker.stop_executions() == 0  # nothing left to do


def test_a_trainer_that_exits_by_itself_is_given_the_exit_grace(
    settings: Settings, engine: Engine, local_for: Callable[[str], LocalDispatcher]
) -> None:
    d = local_for("term")
    run_id = dispatched(settings, engine, d)
    name = load(engine, run_id).execution_name
    assert name is not None
    wait_started(d, name)
    trainer_reports(engine, run_id, failed(run_id))

    worker = Worker(settings, engine, d, exit_grace_seconds=3600)
    assert worker.stop_executions() == 1  # looked at, and left alone within the grace
    assert d.status(name).state == "running"
    (stop,) = stops_of(engine, run_id)
    assert stop.cancel_asked_at is None and stop.status == "pending"
    assert stop.next_attempt_at == stop.created_at + timedelta(seconds=3600)
    assert worker.stop_executions() == 0  # not due again before the grace is over


def test_stopping_an_execution_that_already_ended_is_no_error(
    settings: Settings, engine: Engine, local_for: Callable[[str], LocalDispatcher]
) -> None:
    d = local_for("ok")  # exits 0 at once
    run_id = dispatched(settings, engine, d)
    name = load(engine, run_id).execution_name
    assert name is not None
    assert wait_for(d, name).state == "succeeded"
    trainer_reports(engine, run_id, ev.CompletedEvent(run_id=run_id, seq=1))

    worker = Worker(settings, engine, d, exit_grace_seconds=0)
    assert worker.stop_executions() == 1
    (stop,) = stops_of(engine, run_id)
    assert (stop.status, stop.ended_as, stop.cancel_asked_at) == ("done", "succeeded", None)
    # Never cancelled, so its record still says how it really ended.
    assert d.status(name).state == "succeeded"
    assert load(engine, run_id).execution_ended
    d.cancel(name)  # and a cancel of an execution that is gone is no error either
    assert d.status(name).state == "cancelled"


class FlakyCancels(FakePlatform):
    """The platform refuses the first cancel (its API blinked)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    def cancel(self, execution_name: str) -> None:
        if not self.refused:
            self.refused += 1
            raise DispatchError("transient", "the platform is unavailable")
        super().cancel(execution_name)


def test_a_refused_cancel_is_retried_after_a_backoff(settings: Settings, engine: Engine) -> None:
    platform = FlakyCancels()
    run_id = dispatched(settings, engine, platform)
    trainer_reports(engine, run_id, failed(run_id))
    name = platform.name_of(run_id)
    worker = make_worker(settings, engine, platform, exit_grace_seconds=0, cancel_reask_seconds=0)

    before = utcnow()
    assert worker.stop_executions() == 1
    (stop,) = stops_of(engine, run_id)
    assert stop.status == "pending" and stop.attempts == 1
    assert stop.last_error == "transient: the platform is unavailable"
    assert stop.next_attempt_at >= before + timedelta(seconds=5)  # the first backoff
    assert worker.stop_executions() == 0  # not before it

    with session_scope(engine) as s:  # the backoff passes (no clock in the test)
        s.execute(update(ExecutionStop).values(next_attempt_at=utcnow()))
        s.commit()
    assert worker.stop_executions() == 1
    assert platform.cancels == [name]
    platform.end(name, "cancelled", "Execution was cancelled")
    assert worker.stop_executions() == 1
    assert stops_of(engine, run_id)[0].status == "done"


def test_an_execution_started_for_a_run_cancelled_meanwhile_is_stopped_without_a_grace(
    settings: Settings, engine: Engine
) -> None:
    # The dispatch's own steps, with the worker's crash after the record left out: what is in
    # the database must be enough to stop the execution.
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()
    with session_scope(engine) as s:
        assert service.claim_runs(s, "w1", max_concurrency=4, lease_seconds=60, batch=1) == [run_id]
    with session_scope(engine) as s:
        runs.cancel_run(s, settings, run_id)
    name = "projects/p/executions/started-meanwhile"
    platform.states[name] = ExecutionStatus("running")  # what `run_job` had started
    with session_scope(engine) as s:
        assert not service.record_execution(s, run_id, "w1", Execution(name=name))
    (stop,) = stops_of(engine, run_id)
    assert (stop.execution_name, stop.exits_by_itself) == (name, False)

    worker = make_worker(settings, engine, platform)  # the default exit grace does not apply
    assert worker.stop_executions() == 1
    assert platform.cancels == [name]
    assert load(engine, run_id).status == RunStatus.cancelled


def test_another_replicas_trainer_is_left_to_its_owner(
    settings: Settings,
    engine: Engine,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    local_for: Callable[[str], LocalDispatcher],
) -> None:
    owner = local_for("term")
    run_id = dispatched(settings, engine, owner)
    name = load(engine, run_id).execution_name
    assert name is not None
    wait_started(owner, name)
    trainer_reports(engine, run_id, failed(run_id))

    # A second replica (its own data directory, so its own owner id) cannot see that trainer:
    # it must neither call it ended nor keep the stop claimed.
    other = LocalDispatcher(make_settings(data_dir=tmp_path / "replica-2"))
    try:
        assert other.owner != owner.owner
        bystander = Worker(settings, engine, other, exit_grace_seconds=0, cancel_reask_seconds=0)
        assert bystander.stop_executions() == 0
    finally:
        other.close()
    (stop,) = stops_of(engine, run_id)
    assert (stop.status, stop.attempts, stop.claimed_until) == ("pending", 0, None)
    assert owner.status(name).state == "running"

    worker = Worker(settings, engine, owner, exit_grace_seconds=0, cancel_reask_seconds=0)
    assert worker.stop_executions() == 1  # the owner stops it
    assert wait_for(owner, name).state == "cancelled"
