"""The whole loop, end to end on this machine: REST create → worker → LocalDispatcher → the real
trainer (`python -m trainer`, the tiny Gemma 3, digits) → callbacks → a finished run. What must
not lose a run (a trainer SIGKILLed, the api SIGKILLed or stopped mid-training) is
tests/faults/."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import col, select

from api.config import Settings
from api.db import make_engine, session_scope
from api.events.models import RunEvent
from api.main import create_app
from tests.conftest import LiveServer, free_port
from tests.runs_client import TERMINAL, RunsClient

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


class Loop(RunsClient):
    """An api with its worker on a fixed port (the trainer's callback URL names it), which a
    test can stop and start again like a restarted server."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings, self.port = settings, port
        self.url = f"http://127.0.0.1:{port}"
        self.server: LiveServer | None = None
        super().__init__(self.url, SPEC, "loop")

    def start(self) -> Loop:
        self.server = LiveServer(create_app(self.settings), port=self.port).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


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
