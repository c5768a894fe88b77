"""`tuneplane serve` as a subprocess, for every fault test: a real server on a free port, its
own data directory and the given database, with its log in files beside that directory (so a
test can count what it logged). It can be used as a context manager, or killed, stopped and
started again on the same port, data directory and database (a restarted server). Also the
trainer-run helpers the fault tests share."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from sqlmodel import col, select

from api.db import make_engine, session_scope
from api.events.models import RunEvent
from tests.conftest import free_port
from tests.runs_client import HANG_GUARD_S, RunsClient, wait_until

# A run whose training lasts long enough to be hit mid-way (80 optimizer steps of 2 samples),
# with a small evaluation on either side; the tiny model learns nothing here, on purpose.
TRAINING: dict[str, Any] = {
    "dataset": "digits",
    "train_size": 160,
    "eval_size": 10,
    "num_epochs": 1,
    "learning_rate": 3e-3,
    "batch_size": 2,
    "gradient_accumulation_steps": 1,
    "eval_batch_size": 10,
    "max_new_tokens": 3,
    "gradient_checkpointing": False,
    "save_steps": 1000,  # no periodic checkpoint: the one a SIGTERM makes is the only one
}
# What must never be in the server's log: SQLite's lock error, the pool running dry, a 500.
LOG_FAULTS = re.compile(
    r'database is locked|QueuePool limit|TimeoutError|Traceback|HTTP/1\.1" 500 '
)


class Serve(RunsClient):
    """One `tuneplane serve` process at a time, on a fixed port and data directory; extra
    settings by name (`db_pool_size="2"` is TUNEPLANE_DB_POOL_SIZE, `run_worker="false"` a
    server that dispatches nothing, for the tests that load the api alone)."""

    def __init__(self, data_dir: Path, db_url: str, **settings: str) -> None:
        self.data_dir, self.db_url = data_dir, db_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
        self.env.update(
            TUNEPLANE_DATA_DIR=str(data_dir),
            TUNEPLANE_DATABASE_URL=db_url,
            TUNEPLANE_TRAINER_DEVICE="cpu",
            TUNEPLANE_WORKER_POLL_SECONDS="0.2",
            TUNEPLANE_RECONCILE_SECONDS="0.5",
            TUNEPLANE_HUB_URL="",
            OMP_NUM_THREADS="1",  # trainers inherit it: one thread each on a shared machine
        )
        self.env.update({f"TUNEPLANE_{k.upper()}": v for k, v in settings.items()})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        super().__init__(self.url, TRAINING, "fault")

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> Serve:
        self.starts += 1
        with (self.data_dir.parent / f"serve-{self.port}-{self.starts}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "api", "serve", "--port", str(self.port)],
                env=self.env,
                cwd=self.data_dir.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: self._ready(), f"the server never became ready:\n{self.output()}")
        return self

    def start_training(self, model: Path) -> str:
        """Start, submit a run, and return its id once it trains: the api stored a progress
        event (79 steps to go)."""
        # The tiny model lies outside the data directory, the default (and only) data root.
        self.env["TUNEPLANE_LOCAL_DATA_ROOTS"] = json.dumps([str(model)])
        self.start()
        run_id = self.submit(model)
        run = self.wait(run_id, lambda r: r["last_step"] >= 1, "training began")
        assert run["status"] == "running", run
        return run_id

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.output()
        try:
            return self.client.get("/readyz", timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        """Everything every start of this server logged, in order."""
        logs = sorted(self.data_dir.parent.glob(f"serve-{self.port}-*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def output(self) -> str:
        """The end of each start's log, for an assert's message."""
        logs = sorted(self.data_dir.parent.glob(f"serve-{self.port}-*.log"))
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in logs)

    def faults_in_log(self) -> list[str]:
        return [line for line in self.log().splitlines() if LOG_FAULTS.search(line)]

    def kill(self, sig: int) -> int:
        """Send `sig` and wait for the process to end; its exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=HANG_GUARD_S)
        self.proc = None
        return code

    def close(self) -> None:
        """Stop the server as Ctrl-C does (so that its shutdown is logged, and checked by
        `faults_in_log`), SIGKILL it if that hangs, and leave no trainer behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=60)
        self.proc = None
        self.client.close()
        for pid_file in (self.data_dir / "logs").glob("*.pid"):  # no trainer outlives its test
            if not pid_file.with_suffix(".exit").exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def stored_events(db_url: str, run_id: str) -> list[RunEvent]:
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            query = select(RunEvent).where(RunEvent.run_id == run_id)
            return list(s.exec(query.order_by(col(RunEvent.segment), col(RunEvent.seq))))
    finally:
        engine.dispose()


def trainer_processes(log: Path) -> int:
    """How many trainer processes ran for a run's segment: each logs its preflight once."""
    return log.read_text(errors="replace").count(" preflight: ")
