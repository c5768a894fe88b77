"""`tuneplane serve` and `tuneplane worker` as a person starts them: where trainers are told to
call back, what is printed about the database, and what a bad environment variable gets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

import api
from api.cli.serve import local_url
from api.cli.settings import load_settings
from tests.conftest import free_port

REPO = Path(api.__file__).resolve().parent.parent
PASSWORD = "s3cret-pw"  # PostgreSQL here trusts local connections: the password is not checked


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
    env.update(values)
    return env


def tuneplane(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


# -- where trainers call back -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:9000"),
        ("0.0.0.0", "http://127.0.0.1:9000"),  # a wildcard bind: local trainers use loopback
        ("::", "http://[::1]:9000"),
        ("::1", "http://[::1]:9000"),
        ("10.1.2.3", "http://10.1.2.3:9000"),
        ("tuneplane.internal", "http://tuneplane.internal:9000"),
    ],
)
def test_local_url_of_a_bind_address(host: str, url: str) -> None:
    assert local_url(host, 9000) == url


def test_serve_derives_the_public_url_only_when_it_is_not_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [k for k in os.environ if k.startswith("TUNEPLANE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env file of the checkout
    monkeypatch.setenv("TUNEPLANE_DATA_DIR", str(tmp_path))
    derived = load_settings("tuneplane", public_url="http://127.0.0.1:9000")
    assert derived is not None and derived.public_url == "http://127.0.0.1:9000"
    monkeypatch.setenv("TUNEPLANE_PUBLIC_URL", "https://tuneplane.example.com")
    explicit = load_settings("tuneplane", public_url="http://127.0.0.1:9000")
    assert explicit is not None and explicit.public_url == "https://tuneplane.example.com"


def _with_password(url: str) -> str:
    parsed = make_url(url)
    return parsed.set(password=PASSWORD).render_as_string(hide_password=False)


def _wait_ready(proc: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 180  # a hang guard
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.2)


def test_serve_on_another_port_gets_its_trainers_callbacks(db_url: str, tmp_path: Path) -> None:
    """`serve --port P` without TUNEPLANE_PUBLIC_URL: a local trainer's events reach this server
    (they went to port 8000 before), and the printed database URL hides its password."""
    port = free_port()
    secret_url = _with_password(db_url) if db_url.startswith("postgresql") else db_url
    env = clean_env(
        TUNEPLANE_DATA_DIR=str(tmp_path / "data"),
        TUNEPLANE_DATABASE_URL=secret_url,
        TUNEPLANE_TRAINER_DEVICE="cpu",
        TUNEPLANE_WORKER_POLL_SECONDS="0.2",
        TUNEPLANE_RECONCILE_SECONDS="0.5",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base)
        # A run whose trainer starts, reports, and fails at once: its data directory is missing.
        spec: dict[str, Any] = {
            # Under the data directory, the default TUNEPLANE_LOCAL_DATA_ROOTS.
            "model_id": str(tmp_path / "data" / "no-such-model"),
            "dataset": f"imagefolder:{tmp_path / 'data' / 'no-such-images'}",
            "train_size": 2,
            "eval_size": 2,
        }
        r = httpx.post(f"{base}/api/v1/runs", json={"spec": spec}, timeout=10)
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        deadline = time.monotonic() + 180
        while (run := httpx.get(f"{base}/api/v1/runs/{run_id}", timeout=10).json())[
            "status"
        ] not in ("succeeded", "failed", "cancelled"):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, f"the run never ended: {run}"
            time.sleep(0.5)
        events = httpx.get(f"{base}/api/v1/runs/{run_id}/events", timeout=10).json()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    # The trainer's own events arrived here; without them the reconciler would have failed the
    # run from its exit code alone.
    types = [e["type"] for e in events]
    assert "started" in types and "failed" in types, (types, run, out)
    assert run["status"] == "failed" and "the trainer failed" in run["status_reason"], run
    assert PASSWORD not in out, out
    shown = make_url(secret_url).render_as_string(hide_password=True)
    assert f"database {shown}" in out, out
    assert f"trainers call back at {base}" in out, out


# -- a bad environment variable --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "worker", "token list"])
def test_a_bad_environment_variable_is_one_line_each(command: str, tmp_path: Path) -> None:
    env = clean_env(
        TUNEPLANE_DATA_DIR=str(tmp_path),
        TUNEPLANE_MAX_CONCURRENCY="abc",
        TUNEPLANE_SESSION_HOURS="-1",
        TUNEPLANE_DISPATCHER="kubernetes",
    )
    done = tuneplane(*command.split(), env=env)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and "pydantic" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    named = {line.split(":", 2)[1].strip().split("=")[0] for line in lines}
    assert named == {
        "TUNEPLANE_MAX_CONCURRENCY",
        "TUNEPLANE_SESSION_HOURS",
        "TUNEPLANE_DISPATCHER",
    }, lines
    by_name = dict(line.split(": ", 1)[1].split(": ", 1) for line in lines)
    assert "valid integer" in by_name["TUNEPLANE_MAX_CONCURRENCY='abc'"]
    assert "greater than 0" in by_name["TUNEPLANE_SESSION_HOURS='-1'"]
    assert "'local' or 'cloudrun'" in by_name["TUNEPLANE_DISPATCHER='kubernetes'"]
    assert not (tmp_path / "tuneplane.db").exists()  # nothing was started


def test_demo_names_a_bad_environment_variable_too(tmp_path: Path) -> None:
    env = clean_env(TUNEPLANE_WORKER_POLL_SECONDS="often")
    done = tuneplane("demo", "--data-dir", str(tmp_path), "--port", str(free_port()), env=env)
    assert done.returncode == 2, done
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tuneplane demo: TUNEPLANE_WORKER_POLL_SECONDS='often': "), line
    assert "valid number" in line, line


def test_a_rule_across_settings_is_one_line(tmp_path: Path) -> None:
    # dispatcher=cloudrun needs a signing key; the message names the variables to set.
    env = clean_env(TUNEPLANE_DATA_DIR=str(tmp_path), TUNEPLANE_DISPATCHER="cloudrun")
    done = tuneplane("serve", env=env)
    assert done.returncode == 2, done
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tuneplane: TUNEPLANE_CALLBACK_SIGNING_KEY is required"), line


# -- a database that cannot be opened --------------------------------------------------------------

PROGS = {"serve": "tuneplane", "worker": "tuneplane worker", "token list": "tuneplane token"}


@pytest.mark.parametrize("command", list(PROGS))
def test_a_database_out_of_reach_is_one_line_without_its_password(
    command: str, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://tp:{PASSWORD}@127.0.0.1:{port}/tuneplane"
    done = tuneplane(*command.split(), env=clean_env(TUNEPLANE_DATABASE_URL=url))
    assert done.returncode == 2, done
    (line,) = done.stderr.strip().splitlines()
    shown = f"postgresql://tp:***@127.0.0.1:{port}/tuneplane"
    assert line.startswith(f"{PROGS[command]}: cannot open the database {shown}: "), line
    assert "Connection refused" in line, line
    assert PASSWORD not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"postgres ql://tp:{PASSWORD}@db/tuneplane", "is not a database URL"),
        (f"mysql://tp:{PASSWORD}@db/tuneplane", "runs on postgresql:// and sqlite:// URLs"),
        (f"oracle+nosuch://tp:{PASSWORD}@db/x", "runs on postgresql:// and sqlite:// URLs"),
    ],
)
def test_a_database_url_tuneplane_cannot_use_is_one_line(url: str, says: str) -> None:
    done = tuneplane("token", "list", env=clean_env(TUNEPLANE_DATABASE_URL=url))
    assert done.returncode == 2, done
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tuneplane token: ") and says in line, line
    assert PASSWORD not in done.stderr + done.stdout


def test_a_sqlite_directory_it_cannot_make_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    url = f"sqlite:///{blocker / 'sub' / 'tuneplane.db'}"
    done = tuneplane("worker", env=clean_env(TUNEPLANE_DATABASE_URL=url))
    assert done.returncode == 2, done
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"tuneplane worker: cannot open the database {url}: "), line
    assert "Not a directory" in line, line


def test_a_port_in_use_is_one_line_naming_port_before_serving(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = tuneplane(
            "serve", "--port", str(port), env=clean_env(TUNEPLANE_DATA_DIR=str(tmp_path))
        )
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        f"tuneplane: port {port} is already in use (another server?); choose another with --port"
    ]
    assert "serving on" not in result.stdout, result.stdout
