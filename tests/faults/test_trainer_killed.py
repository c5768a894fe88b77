"""A local trainer SIGKILLed mid-training (the kernel's OOM killer, say) sends no last event: the
worker's reconciler learns it from the supervisor's record of the exit, and fails the run with
a reason that names the signal and shows the log's tail. Its bound is the reconciler's own: the
first reconcile pass after the exit is recorded ends the run (every `reconcile_seconds`, 5 s by
default). The worker is driven pass by pass here, so the test states that bound exactly."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from api.config import Settings
from api.dispatch.local import LocalDispatcher
from api.dispatch.worker import Worker
from api.main import create_app
from tests.api.factories import load_run
from tests.conftest import LiveServer, free_port
from tests.faults.serve import TRAINING
from tests.runs_client import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def api(make_settings: Callable[..., Settings], engine: Engine) -> Iterator[LiveServer]:
    port = free_port()
    settings = make_settings(
        public_url=f"http://127.0.0.1:{port}", trainer_device="cpu", reconcile_seconds=0.001
    )
    server = LiveServer(create_app(settings), port=port).start()  # run_worker is off
    yield server
    server.stop()


def test_a_killed_trainer_fails_its_run_at_the_next_reconcile_with_the_signal(
    api: LiveServer, engine: Engine, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer inherits it
    settings: Settings = api.server.config.app.state.settings
    dispatcher = LocalDispatcher(settings)
    worker = Worker(settings, engine, dispatcher)
    spec = {"model_id": str(tiny_model), **TRAINING}
    r = httpx.post(f"{api.url}/api/v1/runs", json={"spec": spec}, timeout=30)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    try:
        assert worker.dispatch_ready() == 1
        name = load_run(engine, run_id).execution_name
        assert name is not None
        wait_until(lambda: load_run(engine, run_id).last_step >= 1, "training never began")
        pid = dispatcher.trainer_pid(name)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        # The supervisor records the exit; until then the execution is running.
        wait_until(lambda: dispatcher.status(name).state != "running", "the exit was never seen")
        recorded = time.monotonic() - killed
        assert load_run(engine, run_id).status == "running"  # nobody has looked yet
        worker.tick()  # one pass: dispatch, then the reconciler (reconcile_seconds ~0)
    finally:
        worker.stop()
        dispatcher.close()
    run = load_run(engine, run_id)
    assert run.status == "failed"
    reason = run.status_reason or ""
    assert f"execution {name} failed: the trainer was killed by SIGKILL (exit code -9)" in reason
    assert "last lines of its log" in reason
    assert reason.split("last lines of its log", 1)[1].count("\n") >= 1  # with the lines
    print(f"\n[figure] SIGKILL to the supervisor's record of it: {recorded:.2f} s; then 1 pass")
