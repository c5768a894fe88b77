"""Stopping the worker with local trainers running (api/dispatch/shutdown.py), with stand-in
trainer scripts (tests/faults/test_serve_stop.py runs the real one under `tuneplane serve`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine

from api.config import Settings
from api.dispatch.local import LocalDispatcher
from api.dispatch.worker import Worker
from api.runs.states import RunStatus
from tests.api.factories import insert_runs, load_run

HANG_GUARD_S = 120.0

# `bare`: no SIGTERM handler yet (a trainer still importing torch): SIGTERM kills it.
# `saves`: handles SIGTERM as the trainer does, by saving and exiting 0.
TRAINER = r"""
import signal, sys, time
if sys.argv[1] == "saves":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open("started", "w").close()
while True:
    time.sleep(0.05)
"""


def _worker(
    make_settings: Callable[..., Settings], engine: Engine, tmp_path: Path, mode: str, **kw: str
) -> tuple[Worker, LocalDispatcher]:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    settings = make_settings(**kw)
    dispatcher = LocalDispatcher(settings, trainer_command=[sys.executable, str(script), mode])
    return Worker(settings, engine, dispatcher), dispatcher


def _started(dispatcher: LocalDispatcher, run_id: str) -> None:
    marker = dispatcher.settings.runs_dir / run_id / "started"
    deadline = time.monotonic() + HANG_GUARD_S
    while not marker.exists():
        assert time.monotonic() < deadline, "the trainer never started"
        time.sleep(0.05)


def test_a_trainer_killed_by_the_stop_leaves_its_run_queued_for_the_same_segment(
    make_settings: Callable[..., Settings], engine: Engine, tmp_path: Path
) -> None:
    worker, dispatcher = _worker(make_settings, engine, tmp_path, "bare")
    (run_id,) = insert_runs(engine, status=RunStatus.queued, segment=2)
    assert worker.dispatch_ready() == 1
    _started(dispatcher, run_id)
    name = load_run(engine, run_id).execution_name
    assert name is not None
    worker.stop()
    status = dispatcher.status(name)
    assert "killed by SIGTERM" in (status.message or "")  # it could not save...
    run = load_run(engine, run_id)
    # ...and its run is not failed for it: the stop was the service's.
    assert (run.status, run.segment, run.launched_at) == (RunStatus.queued, 2, None)
    assert run.execution_ended
    assert "stopped before segment 2's trainer saved" in (run.status_reason or "")


@pytest.mark.parametrize("on_stop", ["checkpoint", "keep"])
def test_the_setting_decides_whether_the_stop_reaches_the_trainers(
    make_settings: Callable[..., Settings], engine: Engine, tmp_path: Path, on_stop: str
) -> None:
    worker, dispatcher = _worker(
        make_settings, engine, tmp_path, "saves", local_trainers_on_stop=on_stop
    )
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    assert worker.dispatch_ready() == 1
    _started(dispatcher, run_id)
    name = load_run(engine, run_id).execution_name
    assert name is not None
    try:
        worker.stop()
        if on_stop == "keep":
            assert dispatcher.status(name).state == "running"  # left for the next start
            assert load_run(engine, run_id).status == RunStatus.dispatched
        else:
            assert dispatcher.status(name).state == "succeeded"  # it saved and exited 0
            # No `segment_done` came (this stand-in reports nothing): queued all the same.
            assert load_run(engine, run_id).status == RunStatus.queued
    finally:
        dispatcher.interrupt(name)
