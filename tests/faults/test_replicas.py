"""Two api replicas on one database, each with its own local dispatcher and data directory: each
watches only its own trainers, and `max_concurrency` holds over both (it is counted in the
database). Before executions named their owner, each replica's reconciler failed the other's
live runs ("supervisor gone": it cannot see the other's files), which freed their slots while
the trainers ran on: 50 trainers at once against a limit of 10.

The workers are driven tick by tick, so what each replica did is known at every step."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import select

from api.config import Settings
from api.db import make_engine, session_scope
from api.dispatch.local import LocalDispatcher
from api.dispatch.worker import Worker
from api.runs import service as runs
from api.runs.models import Run
from api.runs.states import RunStatus
from tests.api.factories import insert_runs, load_run
from tests.faults.serve import Serve
from tests.runs_client import wait_until

HANG_GUARD_S = 180.0  # a slow machine starts a Python in seconds; this only ends a hang
LIMIT = 2
RUNS = 6

# Marks itself live, records how many trainers were live as it started (itself included: the
# last of any overlapping set to start sees them all), then holds until the test releases it.
HOLDING_TRAINER = r"""
import os, sys, time
shared = sys.argv[1]
run_id = os.environ["TUNEPLANE_RUN_ID"]
live = os.path.join(shared, "live")
os.makedirs(live, exist_ok=True)
open(os.path.join(live, run_id), "x").close()
with open(os.path.join(shared, "starts"), "a") as f:
    f.write("%s %d\n" % (run_id, len(os.listdir(live))))
while not os.path.exists(os.path.join(shared, "release")):
    time.sleep(0.02)
os.unlink(os.path.join(live, run_id))
"""


def _statuses(engine: Engine) -> Counter[str]:
    with session_scope(engine) as s:
        return Counter(str(r.status) for r in s.exec(select(Run)).all())


def _starts(shared: Path) -> list[tuple[str, int]]:
    path = shared / "starts"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(run_id, int(n)) for run_id, n in (line.split() for line in lines)]


def test_replicas_judge_only_their_own_trainers_and_share_one_limit(
    make_settings: Callable[..., Settings], engine: Engine, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    script = tmp_path / "holding_trainer.py"
    script.write_text(HOLDING_TRAINER)
    replicas: list[tuple[Worker, LocalDispatcher, Engine]] = []
    for name in ("a", "b"):
        settings = make_settings(
            data_dir=tmp_path / name, max_concurrency=LIMIT, reconcile_seconds=0.001
        )
        dispatcher = LocalDispatcher(
            settings, trainer_command=[sys.executable, str(script), str(shared)]
        )
        own_engine = make_engine(settings.db_url)  # each replica has its own pool
        worker = Worker(settings, own_engine, dispatcher, worker_id=f"replica-{name}")
        replicas.append((worker, dispatcher, own_engine))
    run_ids = insert_runs(engine, RUNS, status=RunStatus.queued)
    (_, da, _), (_, db, _) = replicas
    assert da.owner != db.owner

    def tick_both() -> None:
        for worker, _, _ in replicas:
            worker.tick()

    try:
        # Until LIMIT trainers are live; then both replicas reconcile a few more times while
        # they hold: neither may fail the other's runs nor start more.
        deadline = time.monotonic() + HANG_GUARD_S
        while len(_starts(shared)) < LIMIT:
            tick_both()
            assert time.monotonic() < deadline, f"trainers never started: {_statuses(engine)}"
            time.sleep(0.05)
        for _ in range(5):
            tick_both()
        held = _statuses(engine)
        assert held["failed"] == 0, held
        assert held["queued"] == RUNS - LIMIT, held
        assert held["dispatched"] + held["running"] == LIMIT, held
        with session_scope(engine) as s:
            names = [r.execution_name for r in s.exec(select(Run)).all() if r.execution_name]
        # Each execution is judged by exactly one replica: the one on its data directory.
        assert all(da.owns(n) != db.owns(n) for n in names), names

        (shared / "release").touch()
        deadline = time.monotonic() + HANG_GUARD_S
        while _statuses(engine)["queued"] or sum(
            _statuses(engine)[s] for s in ("dispatched", "running")
        ):
            tick_both()
            assert time.monotonic() < deadline, f"runs never ended: {_statuses(engine)}"
            time.sleep(0.05)
    finally:
        (shared / "release").touch()
        for worker, dispatcher, own_engine in replicas:
            worker.stop()
            dispatcher.close()
            own_engine.dispose()

    starts = _starts(shared)
    assert Counter(run_id for run_id, _ in starts) == Counter(run_ids)  # each started once
    assert max(n for _, n in starts) <= LIMIT, starts  # never more trainers than the limit
    with session_scope(engine) as s:
        runs = s.exec(select(Run)).all()
        # These trainers report nothing: each run was ended by its own replica's reconciler,
        # once its trainer had exited.
        for run in runs:
            assert run.status == RunStatus.failed, run.status_reason
            assert f"execution {run.execution_name} ended without" in (run.status_reason or "")
        assert {da.owns(r.execution_name or "") for r in runs} == {True, False}  # both worked


def test_two_served_replicas_start_each_of_1000_queued_runs_exactly_once(
    db_kind: str, db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """Two `tuneplane serve` processes, worker on, one PostgreSQL; a trainer command that only
    records its start (run id, and the data directory of the replica that started it)."""
    if db_kind != "postgresql":
        pytest.skip("replicas share a PostgreSQL database; a SQLite file is one server's")
    starts = tmp_path / "starts"
    recorder = tmp_path / "record-start"
    recorder.write_text(f'#!/bin/sh\necho "$TUNEPLANE_RUN_ID $PWD" >> {starts}\n')
    recorder.chmod(0o755)
    replicas = [
        Serve(
            tmp_path / name,
            db_url,
            trainer_python=str(recorder),  # run as `record-start -m trainer <flags>`
            max_concurrency="100",
            reconcile_seconds="0.2",
        )
        for name in ("a", "b")
    ]
    try:
        for replica in replicas:
            replica.start()
        started = time.monotonic()
        run_ids = insert_runs(engine, 1000, status=RunStatus.queued)
        wait_until(
            lambda: _statuses(engine)["failed"] == len(run_ids),
            "the runs never all ended",
            timeout=600,
        )
        took = time.monotonic() - started
    finally:
        for replica in replicas:
            replica.close()
    lines = [line.split() for line in starts.read_text().splitlines()]
    assert Counter(run_id for run_id, _ in lines) == Counter(run_ids)  # each exactly once
    by_replica = Counter(Path(where).parent.parent.name for _, where in lines)
    assert set(by_replica) == {"a", "b"}, by_replica  # both took part
    with session_scope(engine) as s:
        reasons = {r.status_reason or "" for r in s.exec(select(Run)).all()}
    # Each run was ended by the replica that started it, from its trainer's recorded exit.
    assert all("ended without the trainer reporting a result" in r for r in reasons)
    print(f"\n[figure] 1000 runs, 2 replicas: {dict(by_replica)}, all ended in {took:.0f} s")


def test_a_cancel_is_carried_out_by_the_replica_whose_trainer_it_is(
    make_settings: Callable[..., Settings], engine: Engine, tmp_path: Path
) -> None:
    """The other replica cannot see the trainer: it must neither end the run as cancelled while
    the trainer still runs, nor signal anything."""
    shared = tmp_path / "shared"
    shared.mkdir()
    script = tmp_path / "holding_trainer.py"
    script.write_text(HOLDING_TRAINER)
    workers, dispatchers = [], []
    for name in ("a", "b"):
        settings = make_settings(data_dir=tmp_path / name, reconcile_seconds=0.001)
        dispatchers.append(
            LocalDispatcher(settings, trainer_command=[sys.executable, str(script), str(shared)])
        )
        workers.append(Worker(settings, engine, dispatchers[-1], worker_id=f"replica-{name}"))
    (a, b), (da, _) = workers, dispatchers
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    try:
        assert a.dispatch_ready() == 1
        wait_until(lambda: _starts(shared), "the trainer never started")
        with session_scope(engine) as s:
            runs.cancel_run(s, da.settings, run_id)
        for _ in range(3):
            b.tick()
        assert load_run(engine, run_id).status == RunStatus.cancelling
        name = load_run(engine, run_id).execution_name or ""
        assert da.status(name).state == "running"  # b sent it nothing
        a.tick()  # SIGTERM to its trainer
        wait_until(lambda: da.status(name).state != "running", "the trainer never stopped")
        a.tick()
        run = load_run(engine, run_id)
        assert run.status == RunStatus.cancelled, run.status_reason
    finally:
        (shared / "release").touch()
        for worker, dispatcher in zip(workers, dispatchers, strict=True):
            worker.stop()
            dispatcher.close()
