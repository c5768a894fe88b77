"""`tuneplane retrain ... --wait` end to end, as a CI job runs it: a separate process that talks
HTTP to a live api (auth on, a CI token), whose worker trains the tiny model with the local
dispatcher. Each exit status is produced by a real run: 0 passed, 1 gate failed, 2 run failed,
2 run cancelled, 3 timeout (4: could not start)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from api.auth.models import TokenCreate
from api.auth.tokens import create_token
from api.config import Settings
from api.db import make_engine, migrate, session_scope
from api.main import create_app
from tests.conftest import LiveServer, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Api:
    url: str
    token: str
    admin: httpx.Client

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
        return env | {"TUNEPLANE_URL": self.url, "TUNEPLANE_TOKEN": self.token}

    def start(self, *args: str) -> subprocess.Popen[str]:
        """`tuneplane ARGS` as its own process, as a CI job runs it."""
        return subprocess.Popen(
            [sys.executable, "-m", "api", *args],
            cwd=REPO,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def cli(self, *args: str, timeout: float = 660) -> Finished:
        return finish(self.start(*args), timeout)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def finish(proc: subprocess.Popen[str], timeout: float = 660) -> Finished:
    # Past the CLI's own --timeout 10m: a guard against a hang, as is that one.
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return Finished(proc.returncode, out, err)


@pytest.fixture
def api(tmp_path: Path, tiny_model: Path) -> Iterator[Api]:
    # SQLite only: the CLI is a pure HTTP client, and the api's behaviour on PostgreSQL is
    # covered by tests/api (this test trains four runs; twice would double the suite's time).
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'tuneplane.db'}",
        # Runs may read the tiny model, and name a missing data set under tmp_path.
        local_data_roots=[tiny_model, tmp_path],
        auth_enabled=True,
        run_worker=True,
        public_url=f"http://127.0.0.1:{port}",
        # Two trainers at once: the run that must time out waits in the queue behind them.
        max_concurrency=2,
        worker_poll_seconds=0.2,
        reconcile_seconds=1.0,
        trainer_device="cpu",
    )
    engine = make_engine(settings.db_url)
    migrate(engine)
    with session_scope(engine) as session:
        _, ci = create_token(session, TokenCreate(name="ci", scopes=["runs:read", "runs:write"]))
        _, admin = create_token(session, TokenCreate(name="admin", scopes=["admin"]))
    server = LiveServer(create_app(settings), port=port).start()
    headers = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        # As small as a run gets: one optimizer step, eight evaluation samples each side.
        spec = {
            "model_id": str(tiny_model),
            "dataset": "digits",
            "train_size": 16,
            "eval_size": 8,
            "num_epochs": 1,
            "batch_size": 16,
            "gradient_accumulation_steps": 1,
            "eval_batch_size": 8,
            "learning_rate": 3e-3,
            "max_length": 128,
            "max_new_tokens": 4,
            "time_budget_minutes": 10,
        }
        r = client.post(
            "/api/v1/templates",
            json={
                "name": "tiny",
                "spec": spec,
                "gates": {"max_unknown_rate": 1.0, "no_worse_than_champion": True},
                "auto_promote": True,
            },
        )
        assert r.status_code == 201, r.text
        yield Api(server.url, ci, client)
        # No trainer may outlive the test: wait until every run has ended.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            active = client.get(
                "/api/v1/runs", params={"status": ["queued", "dispatched", "running", "cancelling"]}
            ).json()["items"]
            if not active:
                break
            time.sleep(0.5)
    server.stop()
    engine.dispose()


def wait_for_runs(api: Api, n: int, timeout: float = 120) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items: list[dict[str, object]] = api.admin.get("/api/v1/runs").json()["items"]
        if len(items) >= n:
            return items
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} runs after {timeout} s")


def test_retrain_exit_codes_end_to_end(api: Api, tmp_path: Path) -> None:
    started = time.monotonic()
    ci_job = (
        "retrain", "tiny", "--wait", "--timeout", "10m", "--poll", "0.5",
        "--git-sha", "0123abcd", "--pipeline-url", "https://ci.example/runs/1",
        "--idempotency-key", "ci-run-1",
    )  # fmt: skip
    # The cases run at the same time (two trainers at once), which keeps this test short.
    passing = api.start(*ci_job)
    refused = api.start("retrain", "no-such-template", "--wait")
    (first,) = wait_for_runs(api, 1)  # the passing case's run exists: now make version 2
    template = api.admin.get("/api/v1/templates/tiny").json()
    r = api.admin.put(
        "/api/v1/templates/tiny",
        json={"spec": template["spec"], "gates": {"min_accuracy": 1.0, "min_macro_f1": 1.0}},
    )
    assert r.status_code == 200 and r.json()["version"] == 2
    gate_fails = api.start("retrain", "tiny", "--wait", "--timeout", "10m", "--poll", "0.5")
    wait_for_runs(api, 2)  # one at a time, so the queue's order is known
    run_fails = api.start(
        "retrain", "tiny", "--wait", "--timeout", "10m", "--poll", "0.5",
        "--set", f"dataset=imagefolder:{tmp_path / 'no-such-dir'}",
    )  # fmt: skip
    wait_for_runs(api, 3)
    times_out = api.start(
        "retrain", "tiny", "--wait", "--timeout", "1s", "--poll", "0.2", "--cancel-on-timeout"
    )
    earlier = {r["id"] for r in wait_for_runs(api, 4)}
    # Cancelled by someone else while its CI job waits (queued behind the trainers: no time).
    gets_cancelled = api.start("retrain", "tiny", "--wait", "--timeout", "10m", "--poll", "0.2")
    (cancelled_run,) = {r["id"] for r in wait_for_runs(api, 5)} - earlier
    assert api.admin.post(f"/api/v1/runs/{cancelled_run}/cancel").status_code in (200, 202)

    # 4: the request is refused (no such template): nothing started.
    bad = finish(refused)
    assert bad.returncode == 4, bad.stderr
    assert "404" in bad.stderr and "no-such-template" in bad.stderr

    # 3: the timeout passes first (the run is still queued); --cancel-on-timeout cancels it.
    # Determined on any machine: it waits in the queue behind the trainers, and even started at
    # once no run would end within a second (the trainer's import of torch alone takes longer).
    slow = finish(times_out)
    assert slow.returncode == 3, slow.stdout + slow.stderr
    assert "timed out after 1 s" in slow.stdout and "asked the api to cancel" in slow.stdout
    slow_run = slow.stdout.split("run ", 1)[1].split()[0]
    assert api.admin.get(f"/api/v1/runs/{slow_run}").json()["status"] == "cancelled"

    # 2: the run was cancelled.
    cancelled = finish(gets_cancelled)
    assert cancelled.returncode == 2, cancelled.stdout + cancelled.stderr
    assert f"run {cancelled_run} cancelled: cancelled by request" in cancelled.stdout
    assert "gate FAILED" not in cancelled.stdout  # a cancel is not a failed gate (1)

    # 2: the run itself fails (its data set is not there); the trainer's reason is printed.
    failed = finish(run_fails)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "failed: the trainer failed" in failed.stdout and "no-such-dir" in failed.stdout

    # 1: a gate no tiny model can meet.
    gated = finish(gate_fails)
    assert gated.returncode == 1, gated.stdout + gated.stderr
    assert "gate FAILED" in gated.stdout and "is below the minimum 1.0000" in gated.stdout

    # 0: the run succeeds and passes (the template's first: no champion yet) and is champion.
    ok = finish(passing)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "succeeded" in ok.stdout and "gate passed" in ok.stdout
    run_id = str(first["id"])
    assert f"dashboard: {api.url}/runs/{run_id}" in ok.stdout
    assert "step 1/1 (100%)" in ok.stdout  # progress was streamed
    run = api.admin.get(f"/api/v1/runs/{run_id}").json()
    assert run["ci"] == {"git_sha": "0123abcd", "pipeline_url": "https://ci.example/runs/1"}
    assert run["final_accuracy"] is not None and run["template_version"] == 1
    assert api.admin.get("/api/v1/templates/tiny").json()["champion_run_id"] == run_id

    # A re-run of the same CI job (same key) follows the same run: no second training.
    again = api.cli(*ci_job)
    assert again.returncode == 0 and run_id in again.stdout
    assert "already started by an earlier request" in again.stdout

    # runs list / show, over HTTP with the CI token.
    listed = api.cli("runs", "list", "--template", "tiny")
    assert listed.returncode == 0 and run_id in listed.stdout and "passed" in listed.stdout
    shown = api.cli("runs", "show", run_id)
    assert shown.returncode == 0 and "gate       passed" in shown.stdout
    assert "git_sha: 0123abcd" in shown.stdout

    # A usage error is "could not start" (4), never mistaken for a failed run (2).
    usage = api.cli("retrain", "tiny", "--timeout", "soon")
    assert usage.returncode == 4 and "not a duration" in usage.stderr
    print(f"retrain CLI end to end: {time.monotonic() - started:.1f} s")
