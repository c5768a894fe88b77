"""The whole loop, end to end on this machine: REST create → worker → LocalDispatcher → the real
trainer (`python -m trainer`, the tiny Gemma 3, digits) → callbacks → a finished run. Also what
must not lose a run: a trainer killed with SIGKILL, and the api going away mid-training."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import col, select

from api.config import Settings
from api.db import make_engine, migrate, session_scope
from api.dispatch.local import LocalDispatcher
from api.events.models import RunEvent
from api.main import create_app
from tests.conftest import LiveServer, free_port
from trainer.contract.spool import spool_file

pytestmark = pytest.mark.slow

# Small on purpose: these tests are about the loop, not about learning (tests/test_demo.py and
# the trainer's own tests assert that the model learns).
SPEC: dict[str, Any] = {
    "dataset": "digits",
    "train_size": 32,
    "eval_size": 20,
    "num_epochs": 1,
    "learning_rate": 3e-3,
    "batch_size": 16,
    "gradient_accumulation_steps": 1,
    "eval_batch_size": 32,
    "max_new_tokens": 3,
    "gradient_checkpointing": False,
    "save_steps": 1,
}
TERMINAL = ("succeeded", "failed", "cancelled")


class Loop:
    """An api with its worker on a fixed port (the trainer's callback URL names it), which a
    test can stop and start again like a restarted server."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings, self.port = settings, port
        self.url = f"http://127.0.0.1:{port}"
        self.server: LiveServer | None = None
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def start(self) -> Loop:
        self.server = LiveServer(create_app(self.settings), port=self.port).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def submit(self, tiny_model: Path, **changes: Any) -> str:
        spec = {"model_id": str(tiny_model), **SPEC, **changes}
        r = self.client.post("/api/v1/runs", json={"spec": spec, "name": "loop"})
        assert r.status_code == 201, r.text
        run_id: str = r.json()["id"]
        return run_id

    def run(self, run_id: str) -> dict[str, Any]:
        r = self.client.get(f"/api/v1/runs/{run_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def wait(
        self, run_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 240
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if until(run):
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; the run is {run['status']}: {run}")
            time.sleep(0.25)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer inherits the api's environment. With pytest-xdist's workers on two cores,
    # OpenMP's spinning threads would slow the tiny model ten-fold (the demo does the same).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def loop_settings(make_settings: Callable[..., Settings], port: int) -> Settings:
    return make_settings(
        run_worker=True,
        public_url=f"http://127.0.0.1:{port}",
        worker_poll_seconds=0.2,
        reconcile_seconds=0.5,
        trainer_device="cpu",
    )


@pytest.fixture
def loop(make_settings: Callable[..., Settings], engine: Engine) -> Iterator[Loop]:
    """On the database(s) `--db` selects (the `engine` fixture migrated it)."""
    port = free_port()
    lp = Loop(loop_settings(make_settings, port), port).start()
    yield lp
    _teardown(lp)


@pytest.fixture
def sqlite_loop(tmp_path: Path, tiny_model: Path) -> Iterator[Loop]:
    """SQLite only: for what the database plays no part in, to keep the suite short."""
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'loop.db'}",
        local_data_roots=[tiny_model],  # outside the data directory: runs may read it
        run_worker=True,
        public_url=f"http://127.0.0.1:{port}",
        worker_poll_seconds=0.2,
        reconcile_seconds=0.5,
        trainer_device="cpu",
    )
    engine = make_engine(settings.db_url)
    migrate(engine)
    engine.dispose()
    lp = Loop(settings, port).start()
    yield lp
    _teardown(lp)


def _teardown(lp: Loop) -> None:
    lp.stop()
    lp.client.close()
    # No trainer may outlive its test.
    for pid_file in lp.settings.logs_dir.glob("*.pid"):
        if not pid_file.with_suffix(".exit").exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def events_of(settings: Settings, run_id: str) -> list[RunEvent]:
    engine = make_engine(settings.db_url)
    try:
        with session_scope(engine) as s:
            return list(
                s.exec(
                    select(RunEvent).where(RunEvent.run_id == run_id).order_by(col(RunEvent.seq))
                )
            )
    finally:
        engine.dispose()


def test_rest_to_trainer_to_callbacks_to_a_succeeded_run(loop: Loop, tiny_model: Path) -> None:
    run_id = loop.submit(tiny_model)
    run = loop.wait(run_id, lambda r: r["status"] in TERMINAL)
    assert run["status"] == "succeeded", run["status_reason"]
    assert run["execution_name"].startswith(f"local:{run_id}:0:")
    assert run["started_at"] and run["finished_at"]
    assert run["baseline_accuracy"] is not None and run["final_accuracy"] is not None
    assert run["baseline_macro_f1"] is not None and run["final_macro_f1"] is not None
    assert run["last_step"] == run["total_steps"] == 2  # 32 samples, batch 16, one epoch

    metrics = loop.client.get(f"/api/v1/runs/{run_id}/metrics").json()
    assert [p["step"] for p in metrics["progress"]] == [1, 2]
    assert all(p["loss"] is not None for p in metrics["progress"])
    assert metrics["baseline"]["num_samples"] == metrics["final"]["num_samples"] == 20
    assert len(metrics["final"]["per_class"]) == 10

    # Every event arrived once, in one unbroken sequence ending with `completed`.
    stored = events_of(loop.settings, run_id)
    assert [e.seq for e in stored] == list(range(len(stored)))
    assert stored[0].type == "started" and stored[-1].type == "completed"
    assert all(e.outcome.startswith(("applied", "recorded")) for e in stored)

    # What the run links to exists: its log and its outputs.
    log = Path(run["log_uri"].removeprefix("file://"))
    assert "completed in" in log.read_text()
    assert (Path(run["artifact_uri"]) / "adapter" / "adapter_config.json").is_file()
    assert (Path(run["artifact_uri"]) / "results.json").is_file()


def test_a_trainer_killed_with_sigkill_fails_its_run_with_the_reason(
    sqlite_loop: Loop, tiny_model: Path
) -> None:
    loop = sqlite_loop
    # 400 steps: still training when the kill comes, however fast the machine (it is killed,
    # so the length costs nothing).
    run_id = loop.submit(tiny_model, train_size=320, num_epochs=20)
    run = loop.wait(run_id, lambda r: r["status"] == "running" or r["status"] in TERMINAL)
    assert run["status"] == "running"
    pid = LocalDispatcher(loop.settings).trainer_pid(run["execution_name"])
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    run = loop.wait(run_id, lambda r: r["status"] in TERMINAL)
    assert run["status"] == "failed"
    reason = run["status_reason"]
    assert "killed by SIGKILL (exit code -9)" in reason
    assert "last lines of its log" in reason
    assert reason.split("last lines of its log", 1)[1].count("\n") >= 1  # with the lines


def test_events_spooled_while_the_api_was_down_all_arrive(
    sqlite_loop: Loop, tiny_model: Path
) -> None:
    loop = sqlite_loop
    run_id = loop.submit(tiny_model)
    # As soon as the trainer is started: before its first event, or just after; its last one
    # (`completed`) comes only after loading, two evaluations and training, so the api is gone
    # well before the trainer ends, on any machine.
    loop.wait(run_id, lambda r: r["status"] in ("dispatched", "running"))
    loop.stop()  # the api (and its worker) go away mid-run; the trainer carries on

    spool = spool_file(loop.settings.data_dir.resolve() / "spool", run_id)
    deadline = time.monotonic() + 120
    while not spool.exists():
        assert time.monotonic() < deadline, "the trainer never spooled an event"
        time.sleep(0.2)
    loop.start()  # a new api process: same database, same port

    run = loop.wait(run_id, lambda r: r["status"] in TERMINAL)
    assert run["status"] == "succeeded", run["status_reason"]
    assert run["final_accuracy"] is not None and run["last_step"] == 2
    stored = events_of(loop.settings, run_id)
    # Nothing lost: the sequence has no gap, from `started` to `completed`.
    assert [e.seq for e in stored] == list(range(len(stored)))
    assert stored[-1].type == "completed"
    deadline = time.monotonic() + 120  # a hang guard
    while spool.exists():  # re-sent, so removed
        assert time.monotonic() < deadline, "the spool was never emptied"
        time.sleep(0.2)
