"""The dispatch worker against real databases, with an in-process fake of the platform (the cloud
edge) built on the Dispatcher protocol: claims, concurrency, retries, cancels, the reconciler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update
from sqlmodel import col

from api.auth.callback import verify_token
from api.config import Settings
from api.db import make_engine, session_scope
from api.dispatch.base import DispatchError, Execution, ExecutionStatus, Launch
from api.dispatch.service import RetryPolicy
from api.dispatch.worker import Worker
from api.events import service as events
from api.runs import service as runs
from api.runs.models import Run
from api.runs.states import RunStatus
from tests.api.factories import insert_runs
from trainer.contract import events as ev

NO_WAIT = RetryPolicy(max_attempts=3, first_backoff_seconds=0, quota_retry_seconds=0)


class FakePlatform:
    """Executions that live in memory: `start` records the launch; each execution runs until
    the test ends it (or, with `polls_to_end`, until it has been polled that many times)."""

    def __init__(self, polls_to_end: int | None = None) -> None:
        self.lock = threading.Lock()
        self.launches: list[Launch] = []
        self.states: dict[str, ExecutionStatus] = {}
        self.polls: Counter[str] = Counter()
        self.cancels: list[str] = []
        self.errors: list[BaseException] = []
        self.polls_to_end = polls_to_end
        self.on_start: Callable[[Launch], None] | None = None
        self.live = 0
        self.most_live = 0

    def start(self, launch: Launch) -> Execution:
        with self.lock:
            if self.errors:
                raise self.errors.pop(0)
            name = (
                f"projects/p/executions/{launch.run_id}-{launch.env.segment}-{len(self.launches)}"
            )
            self.launches.append(launch)
            self.states[name] = ExecutionStatus("running")
            self.live += 1
            self.most_live = max(self.most_live, self.live)
        if self.on_start:
            self.on_start(launch)
        return Execution(
            name=name,
            log_uri=f"https://console/logs/{name}",
            artifact_uri=f"mem://runs/{launch.run_id}",
            checkpoint_uri=f"mem://runs/{launch.run_id}/checkpoints",
        )

    def status(self, execution_name: str) -> ExecutionStatus:
        with self.lock:
            self.polls[execution_name] += 1
            state = self.states[execution_name]
            if (
                state.state == "running"
                and self.polls_to_end is not None
                and self.polls[execution_name] >= self.polls_to_end
            ):
                self.end(execution_name, "failed", "Task exceeded its memory limit", locked=True)
            return self.states[execution_name]

    def cancel(self, execution_name: str) -> None:
        with self.lock:
            self.cancels.append(execution_name)

    def close(self) -> None:
        pass

    def end(self, name: str, state: str, message: str | None = None, locked: bool = False) -> None:
        if not locked:
            with self.lock:
                return self.end(name, state, message, locked=True)
        if self.states[name].state == "running":
            self.live -= 1
        self.states[name] = ExecutionStatus(state, message)  # type: ignore[arg-type]
        return None

    def name_of(self, run_id: str) -> str:
        return next(n for n in reversed(list(self.states)) if f"/{run_id}-" in n)


def load(engine: Engine, run_id: str) -> Run:
    with session_scope(engine) as s:
        run = s.get(Run, run_id)
        assert run is not None
        return run


def make_worker(settings: Settings, engine: Engine, platform: FakePlatform, **kw: Any) -> Worker:
    return Worker(settings, engine, platform, **kw)  # type: ignore[arg-type]


# -- dispatching ---------------------------------------------------------------------------------


def test_dispatch_builds_the_launch_and_records_the_execution(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    settings = make_settings(public_url="https://api.example.com/")
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()
    before = datetime.now(UTC)
    assert make_worker(settings, engine, platform).dispatch_ready() == 1
    after = datetime.now(UTC)

    (launch,) = platform.launches
    env = launch.env
    assert launch.run_id == env.run_id == run_id
    assert launch.spec.model_dump(mode="json") == load(engine, run_id).spec
    assert env.callback_url == f"https://api.example.com/api/v1/runs/{run_id}/events"
    assert env.callback_token is not None
    verify_token(settings.signing_key, env.callback_token.get_secret_value(), run_id)
    budget = timedelta(minutes=launch.spec.time_budget_minutes)
    # Bounded by the clock read before and after, not by a slack a slow machine could exceed.
    assert env.deadline is not None and before + budget <= env.deadline <= after + budget
    assert env.segment == 0
    assert env.segment_max_steps is None  # production: segments end at their deadline only

    run = load(engine, run_id)
    assert run.status == RunStatus.dispatched
    assert run.execution_name == platform.name_of(run_id)
    assert run.log_uri == f"https://console/logs/{run.execution_name}"
    assert run.artifact_uri == f"mem://runs/{run_id}"
    assert run.checkpoint_uri == f"mem://runs/{run_id}/checkpoints"
    assert run.claimed_by is None and run.dispatch_attempts == 0


def test_the_segment_step_limit_reaches_the_trainer(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    settings = make_settings(segment_max_steps=7)
    insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()
    assert make_worker(settings, engine, platform).dispatch_ready() == 1
    (launch,) = platform.launches
    assert launch.env.segment_max_steps == 7
    assert launch.env.as_environ()["TUNEPLANE_SEGMENT_MAX_STEPS"] == "7"


def test_max_concurrency_counts_dispatched_running_and_cancelling(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    settings = make_settings(max_concurrency=3)
    insert_runs(engine, 1, status=RunStatus.running)
    insert_runs(engine, 1, status=RunStatus.cancelling)
    queued = insert_runs(engine, 4, status=RunStatus.queued)
    platform = FakePlatform()
    worker = make_worker(settings, engine, platform)
    assert worker.dispatch_ready() == 1
    assert worker.dispatch_ready() == 0
    assert [load(engine, r).status for r in queued] == ["dispatched", "queued", "queued", "queued"]

    # When an execution ends (the reconciler sees it), the next run goes, oldest first.
    platform.end(platform.name_of(queued[0]), "failed", "boom")
    worker.reconcile()
    assert worker.dispatch_ready() == 1
    assert load(engine, queued[1]).status == RunStatus.dispatched


def test_runs_wait_for_not_before_and_for_other_workers_claims(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    later = datetime.now(UTC) + timedelta(minutes=5)
    earlier = datetime.now(UTC) - timedelta(seconds=1)
    (waiting,) = insert_runs(engine, status=RunStatus.queued, not_before=later)
    (held,) = insert_runs(
        engine, status=RunStatus.queued, claimed_by="other", claim_expires_at=later
    )
    (stale,) = insert_runs(
        engine, status=RunStatus.queued, claimed_by="dead", claim_expires_at=earlier
    )
    platform = FakePlatform()
    assert make_worker(make_settings(max_concurrency=10), engine, platform).dispatch_ready() == 1
    assert [launch.run_id for launch in platform.launches] == [stale]
    assert load(engine, waiting).status == load(engine, held).status == RunStatus.queued


def test_transient_errors_back_off_exponentially_then_fail(
    settings: Settings, engine: Engine
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()
    platform.errors = [DispatchError("transient", "UNAVAILABLE: try again")] * 3
    worker = make_worker(settings, engine, platform, retry=RetryPolicy(max_attempts=3))

    waits = []
    for attempt in (1, 2):
        t0 = datetime.now(UTC)
        worker.dispatch_ready()
        run = load(engine, run_id)
        assert run.status == RunStatus.queued and run.dispatch_attempts == attempt
        assert run.status_reason is not None and f"attempt {attempt} of 3" in run.status_reason
        assert run.not_before is not None
        waits.append((run.not_before - t0).total_seconds())
        assert worker.dispatch_ready() == 0  # not before its time
        with session_scope(engine) as s:  # let the time pass
            s.execute(update(Run).where(col(Run.id) == run_id).values(not_before=None))
            s.commit()
    assert 4.5 < waits[0] < 6 and 9.5 < waits[1] < 11  # 5 s, then 10 s
    worker.dispatch_ready()
    run = load(engine, run_id)
    assert run.status == RunStatus.failed
    assert run.status_reason is not None
    assert "3 times" in run.status_reason and "UNAVAILABLE" in run.status_reason
    assert platform.launches == []


def test_quota_errors_leave_the_run_queued_with_the_reason(
    settings: Settings, engine: Engine
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()
    platform.errors = [DispatchError("quota", "no nvidia-l4 quota left in us-central1")] * 10
    worker = make_worker(settings, engine, platform)
    worker.dispatch_ready()
    run = load(engine, run_id)
    assert run.status == RunStatus.queued and run.dispatch_attempts == 0
    assert run.status_reason is not None and "waiting for a GPU" in run.status_reason
    assert "nvidia-l4" in run.status_reason
    assert run.not_before is not None and run.not_before > datetime.now(UTC) + timedelta(seconds=50)
    # Within the bounded wait (tests/cloud/test_cloudrun_faults.py: then it fails) it stays
    # queued however often it is tried.
    worker = make_worker(settings, engine, platform, retry=NO_WAIT)
    for _ in range(6):
        worker.dispatch_ready()
    assert load(engine, run_id).status == RunStatus.queued


def test_permanent_and_unexpected_errors(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    settings = make_settings(max_concurrency=5)
    doomed, unlucky = insert_runs(engine, 2, status=RunStatus.queued)
    platform = FakePlatform()
    platform.errors = [
        DispatchError("permanent", "PERMISSION_DENIED: grant roles/run.invoker to the api"),
        RuntimeError("a bug in a dispatcher"),
    ]
    make_worker(settings, engine, platform, retry=NO_WAIT).dispatch_ready()
    run = load(engine, doomed)
    assert run.status == RunStatus.failed
    assert (
        run.status_reason
        == "dispatch failed: PERMISSION_DENIED: grant roles/run.invoker to the api"
    )
    run = load(engine, unlucky)  # treated as transient: retried
    assert run.status == RunStatus.queued and run.dispatch_attempts == 1
    assert "a bug in a dispatcher" in (run.status_reason or "")


def test_the_next_segment_resumes_from_the_checkpoint(settings: Settings, engine: Engine) -> None:
    (run_id,) = insert_runs(
        engine,
        status=RunStatus.queued,
        segment=2,
        checkpoint_uri="mem://runs/x/checkpoints/step-80",
    )
    platform = FakePlatform()
    make_worker(settings, engine, platform).dispatch_ready()
    assert platform.launches[0].env.segment == 2
    # The precise checkpoint an earlier segment reported is kept over the location.
    assert load(engine, run_id).checkpoint_uri == "mem://runs/x/checkpoints/step-80"


def test_a_trainer_faster_than_the_dispatch_record_is_not_lost(
    settings: Settings, engine: Engine
) -> None:
    """The trainer's `started` (even its `completed`) may land before the worker records the
    dispatch; they are deferred and applied right after."""
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()

    def trainer_reports(launch: Launch) -> None:
        for i, event in enumerate(
            [ev.StartedEvent(run_id=run_id, seq=0), ev.CompletedEvent(run_id=run_id, seq=1)]
        ):
            with session_scope(engine) as s:
                assert events.ingest(s, run_id, event).outcome.startswith("deferred"), i

    platform.on_start = trainer_reports
    make_worker(settings, engine, platform).dispatch_ready()
    run = load(engine, run_id)
    assert run.status == RunStatus.succeeded and run.started_at is not None


# -- cancels ---------------------------------------------------------------------------------------


def test_cancel_stops_the_execution_then_the_run_is_cancelled(
    settings: Settings, engine: Engine
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()
    worker = make_worker(settings, engine, platform, cancel_reask_seconds=3600)
    worker.dispatch_ready()
    with session_scope(engine) as s:
        runs.cancel_run(s, settings, run_id)
    assert load(engine, run_id).status == RunStatus.cancelling
    name = platform.name_of(run_id)

    worker.finish_cancels()
    worker.finish_cancels()  # asked once; not again before cancel_reask_seconds
    assert platform.cancels == [name]
    assert load(engine, run_id).status == RunStatus.cancelling

    platform.end(name, "cancelled", "Execution was cancelled")
    worker.finish_cancels()
    run = load(engine, run_id)
    assert run.status == RunStatus.cancelled and run.finished_at is not None


def test_a_run_cancelled_while_it_starts_has_its_execution_stopped(
    settings: Settings, engine: Engine
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()

    def cancelled_meanwhile(launch: Launch) -> None:
        with session_scope(engine) as s:
            runs.cancel_run(s, settings, run_id)

    platform.on_start = cancelled_meanwhile
    assert make_worker(settings, engine, platform).dispatch_ready() == 0
    run = load(engine, run_id)
    assert run.status == RunStatus.cancelled
    assert platform.cancels == [platform.name_of(run_id)]
    assert run.execution_name == platform.name_of(run_id)  # the record says what ran


def test_a_trainer_stopped_by_a_cancel_ends_the_run_at_its_segment_done(
    settings: Settings, engine: Engine, client: TestClient
) -> None:
    """The cancel path end to end, in a run's second segment: the worker stops the execution
    (the platform's SIGTERM), the trainer saves a checkpoint and reports `segment_done`, exactly
    as it does at its deadline (trainer/deadline.py). The run must end `cancelled` with the
    checkpoint kept, and no further segment may start."""
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()
    worker = make_worker(settings, engine, platform, cancel_reask_seconds=3600)

    def trainer_posts(event: ev.Event) -> dict[str, Any]:
        # As the current execution's trainer would: to its callback URL, with its credential.
        env = platform.launches[-1].env
        assert env.callback_token is not None
        r = client.post(
            urlsplit(env.callback_url).path,
            content=event.model_dump_json(),
            headers={
                "Authorization": f"Bearer {env.callback_token.get_secret_value()}",
                "Content-Type": "application/json",
            },
        )
        assert r.status_code in (200, 201), r.text
        body: dict[str, Any] = r.json()
        return body

    def segment_done(segment: int, step: int) -> ev.Event:
        data = ev.SegmentDone(step=step, checkpoint_uri=f"mem://ck/step-{step}")
        return ev.SegmentDoneEvent(run_id=run_id, seq=1, segment=segment, data=data)

    # Segment 0 reaches its deadline: the run waits for, and gets, a next segment.
    worker.tick()
    trainer_posts(ev.StartedEvent(run_id=run_id, seq=0, segment=0))
    done = trainer_posts(segment_done(0, 10))
    assert (done["outcome"], done["run_status"]) == ("applied: queued for segment 1", "queued")
    platform.end(platform.name_of(run_id), "succeeded")  # the trainer exits 0
    worker.tick()
    assert [launch.env.segment for launch in platform.launches] == [0, 1]
    trainer_posts(ev.StartedEvent(run_id=run_id, seq=0, segment=1))
    assert load(engine, run_id).status == RunStatus.running

    # Cancelled during segment 1.
    r = client.post(f"/api/v1/runs/{run_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    worker.tick()
    name = platform.name_of(run_id)
    assert platform.cancels == [name]

    # SIGTERM: the trainer saves at step 17 and reports segment_done, then exits.
    stopped = segment_done(1, 17)
    done = trainer_posts(stopped)
    assert done["run_status"] == "cancelled"
    assert done["outcome"].startswith("applied: the cancel is finished")
    platform.end(name, "cancelled", "Execution was cancelled")
    worker.tick()
    worker.reconcile()
    # The reporter retrying its post (an answer lost on the way) changes nothing.
    again = trainer_posts(stopped)
    assert again["duplicate"] is True and again["run_status"] == "cancelled"

    run = load(engine, run_id)
    assert run.status == RunStatus.cancelled and run.finished_at is not None
    assert run.status_reason == "cancelled; checkpoint at step 17 kept"
    assert (run.segment, run.last_step, run.checkpoint_uri) == (1, 17, "mem://ck/step-17")
    assert run.claimed_by is None
    assert len(platform.launches) == 2  # no segment 2


# -- the reconciler --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "message", "status", "reason"),
    [
        ("failed", "Task exceeded its memory limit", "failed", "Task exceeded its memory limit"),
        ("succeeded", None, "failed", "without the trainer reporting a result"),
        ("cancelled", "cancelled by alice@", "cancelled", "cancelled outside tuneplane"),
    ],
)
def test_an_execution_that_ended_silently_moves_its_run_on(
    settings: Settings, engine: Engine, state: str, message: str | None, status: str, reason: str
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()
    worker = make_worker(settings, engine, platform)
    worker.dispatch_ready()
    worker.reconcile()
    assert load(engine, run_id).status == RunStatus.dispatched  # still running: untouched

    platform.end(platform.name_of(run_id), state, message)
    # A new worker (an api restart) knows nothing in memory and still finds it.
    make_worker(settings, engine, platform).reconcile()
    run = load(engine, run_id)
    assert run.status == status
    assert run.status_reason is not None and reason in run.status_reason
    if message:
        assert message in run.status_reason


def test_the_reconciler_leaves_runs_whose_trainer_reported(
    settings: Settings, engine: Engine
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    platform = FakePlatform()
    worker = make_worker(settings, engine, platform)
    worker.dispatch_ready()
    with session_scope(engine) as s:
        events.ingest(s, run_id, ev.CompletedEvent(run_id=run_id, seq=0))
    platform.end(platform.name_of(run_id), "succeeded")
    worker.reconcile()
    run = load(engine, run_id)
    assert run.status == RunStatus.succeeded and run.status_reason == "completed"


# -- the thread and several workers ----------------------------------------------------------------


def test_the_app_starts_and_stops_its_worker(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    from api.main import create_app

    def workers() -> int:
        return sum(t.name == "tuneplane-worker" and t.is_alive() for t in threading.enumerate())

    before = workers()
    with TestClient(create_app(make_settings(run_worker=True))):
        assert workers() == before + 1
    deadline = time.monotonic() + 120  # a hang guard
    while workers() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers() == before


@pytest.mark.parametrize("max_concurrency", [1000, 4])
def test_two_workers_never_dispatch_a_run_twice(
    make_settings: Callable[..., Settings], engine: Engine, max_concurrency: int
) -> None:
    """Two workers, each with its own engine (as two api replicas would be), on one database."""
    waves = max_concurrency < 100
    n = 60 if waves else 240
    settings = make_settings(
        max_concurrency=max_concurrency,
        worker_poll_seconds=0.01,
        reconcile_seconds=0.01 if waves else 60,
    )
    run_ids = insert_runs(engine, n, status=RunStatus.queued)
    # With a low limit, executions end on their second poll and the runs go in waves.
    platform = FakePlatform(polls_to_end=2 if waves else None)
    threads: Counter[int] = Counter()
    # Each worker's first launch waits for the other's, so both take part however the threads
    # are scheduled (a fast one could otherwise take every run). With the low limit, claims of
    # 2 leave room for the second worker's while the first waits.
    both_started = threading.Barrier(2, timeout=120)

    def on_start(launch: Launch) -> None:
        threads.update([threading.get_ident()])
        if threads[threading.get_ident()] == 1:
            both_started.wait()

    platform.on_start = on_start
    batch = 2 if waves else 8
    engines = [make_engine(settings.db_url) for _ in range(2)]
    workers = [
        make_worker(settings, e, platform, worker_id=f"w{i}", claim_batch=batch)
        for i, e in enumerate(engines)
    ]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 300  # a hang guard
        while len(platform.launches) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for w in workers:
            w.stop()
        for e in engines:
            e.dispose()
    launched = Counter(launch.run_id for launch in platform.launches)
    assert sorted(launched) == sorted(run_ids)
    assert set(launched.values()) == {1}
    assert platform.most_live <= max_concurrency
    assert len(threads) == 2  # both workers took part


def test_tuneplane_worker_runs_alone_and_stops_on_sigterm(
    settings: Settings, engine: Engine
) -> None:
    """`tuneplane worker` dispatches from the database by itself (here: a run whose trainer
    command fails at once) and stops cleanly on SIGTERM."""
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
    env.update(
        TUNEPLANE_DATABASE_URL=settings.db_url,
        TUNEPLANE_DATA_DIR=str(settings.data_dir),
        TUNEPLANE_TRAINER_PYTHON="/nonexistent/python",
        TUNEPLANE_WORKER_POLL_SECONDS="0.2",
        TUNEPLANE_RECONCILE_SECONDS="0.2",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "api", "worker"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # a hang guard
        while load(engine, run_id).status != RunStatus.failed:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the worker never finished the run"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "tuneplane worker" in out and "local dispatcher" in out
    reason = load(engine, run_id).status_reason or ""
    assert "could not be started" in reason and "/nonexistent/python" in reason
