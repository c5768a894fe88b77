"""A real `tuneplane serve` with `TUNEPLANE_LOG_FORMAT=json`, auth on and every secret set to a
known value, driven through a realistic flow: a token made with the CLI, a dashboard login, a
template with a webhook, a run from it whose local trainer calls back and fails, its webhook
delivered to a receiver on loopback. Then:

- every line the server wrote is a JSON object with the fields Cloud Logging reads (severity,
  message, time), the request's trace where one was sent, and the run id and execution where
  the worker logged about a run;
- no secret (API token, callback token, webhook secret, a webhook URL's path, which is the
  credential of a Slack-style receiver, signing key, database password) is in the server's
  output, the trainer's log, any API response or any dashboard page.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.cli.test_serve import PASSWORD, _wait_ready, _with_password, clean_env
from tests.conftest import free_port

SIGNING_KEY = "signing-key-5f0e1d2c3b4a59687766554433221100"
WEBHOOK_SECRET = "server-webhook-secret-0a1b2c3d4e5f"
OWN_HOOK_SECRET = "own-hook-secret-9f8e7d6c5b4a3210"
HOOK_PATH = "/services/T0HOOK/B0HOOK/hook-path-credential-7a6b5c4d"
TRACE = "105445aa7843bc8bf206b12000100000"
SEVERITIES = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[bytes]]]:
    posts: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}{HOOK_PATH}", posts
    server.shutdown()
    server.server_close()


def _cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "api", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout + done.stderr


def _login(client: httpx.Client, token: str) -> None:
    page = client.get("/login")
    field = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert field is not None, page.text
    form = {"csrf_token": field.group(1), "token": token, "next": "/"}
    key = re.search(r'name="form_key" value="([^"]+)"', page.text)
    if key:
        form["form_key"] = key.group(1)
    assert client.post("/login", data=form, follow_redirects=False).status_code in (302, 303)


def _flow(base: str, token: str, hook: str, seen: list[str]) -> str:
    """Everything a person and a trainer do; every answer's headers and body go to `seen`."""
    api = {"Authorization": f"Bearer {token}", "X-Cloud-Trace-Context": f"{TRACE}/42;o=1"}
    with httpx.Client(base_url=base, headers=api, timeout=30) as c:

        def keep(r: httpx.Response) -> httpx.Response:
            seen.append(f"{r.request.method} {r.url} {r.status_code}\n{r.headers}\n{r.text}")
            return r

        spec = {"model_id": "/nonexistent/model", "dataset": "digits", "train_size": 2}
        body = {
            "name": "pets",
            "spec": spec,
            "webhooks": [{"url": hook, "secret": OWN_HOOK_SECRET}],
        }
        assert keep(c.post("/api/v1/templates", json=body)).status_code == 201
        r = keep(c.post("/api/v1/templates/pets/runs", json={}))
        assert r.status_code == 201, r.text
        run_id: str = r.json()["run_id"]
        deadline = time.monotonic() + 180
        while keep(c.get(f"/api/v1/runs/{run_id}")).json()["status"] not in ("failed",):
            assert time.monotonic() < deadline, "the run never failed"
            time.sleep(0.5)
        while not keep(c.get(f"/api/v1/runs/{run_id}/deliveries")).json()[0]["delivered_at"]:
            assert time.monotonic() < deadline, "the webhook was never delivered"
            time.sleep(0.3)
        for path in ["/api/v1/runs", f"/api/v1/runs/{run_id}/events", "/api/v1/templates",
                     f"/api/v1/runs/{run_id}/metrics", "/api/v1/tokens", "/openapi.json",
                     "/readyz", "/metrics", f"/api/v1/runs/{run_id}/logs",
                     "/api/v1/templates/pets", "/api/v1/templates/pets/versions"]:  # fmt: skip
            keep(c.get(path))
    with httpx.Client(base_url=base, timeout=30, follow_redirects=True) as browser:
        _login(browser, token)
        for path in ["/", f"/runs/{run_id}", "/templates", "/templates/pets", "/runs/new",
                     "/templates/pets/edit", "/templates/_new?from=pets"]:  # fmt: skip
            assert keep(browser.get(path)).status_code == 200, path
    return run_id


def test_serve_logs_json_and_shows_no_secret(
    db_url: str, tmp_path: Path, receiver: tuple[str, list[bytes]]
) -> None:
    hook, posts = receiver
    database_url = _with_password(db_url) if db_url.startswith("postgresql") else db_url
    env = clean_env(
        TUNEPLANE_DATA_DIR=str(tmp_path / "data"),
        TUNEPLANE_DATABASE_URL=database_url,
        TUNEPLANE_AUTH_ENABLED="true",
        TUNEPLANE_LOG_FORMAT="json",
        TUNEPLANE_GCP_PROJECT="tp-proj",
        TUNEPLANE_CALLBACK_SIGNING_KEY=SIGNING_KEY,
        TUNEPLANE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        TUNEPLANE_WEBHOOK_ALLOWED_NETWORKS='["127.0.0.0/8"]',
        TUNEPLANE_WEBHOOK_BACKOFF_SECONDS="0.1",
        TUNEPLANE_TRAINER_DEVICE="cpu",
        TUNEPLANE_WORKER_POLL_SECONDS="0.2",
        TUNEPLANE_RECONCILE_SECONDS="0.5",
        TUNEPLANE_LOCAL_DATA_ROOTS='["/nonexistent"]',  # the run's model: one that fails at once
        OMP_NUM_THREADS="1",
    )
    created = _cli(env, tmp_path, "token", "create", "--name", "ops", "--scopes", "admin")
    token = re.search(r"tp_[A-Za-z0-9_-]{20,}", created)
    assert token is not None, created
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}")
        run_id = _flow(f"http://127.0.0.1:{port}", token.group(0), hook, seen)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert len(posts) == 1

    # -- the log: JSON lines Cloud Logging reads ----------------------------------------------
    lines = [line for line in out.splitlines() if line.strip()]
    entries = []
    for line in lines[1:]:  # the first is serve's own start line, printed before logging starts
        try:
            entry = json.loads(line)  # every line is one JSON object
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r} in\n{out}") from None
        assert entry["severity"] in SEVERITIES and entry["message"], entry
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00$", entry["time"]), entry
        entries.append(entry)
    traced = [e for e in entries if e.get("logging.googleapis.com/trace")]
    assert traced, entries
    assert {e["logging.googleapis.com/trace"] for e in traced} == {
        f"projects/tp-proj/traces/{TRACE}"
    }
    assert all(e["logging.googleapis.com/spanId"] == "42" for e in traced)
    assert any(
        e.get("run_id") == run_id and f"GET /api/v1/runs/{run_id}" in e["message"] for e in traced
    )
    started = [e for e in entries if "started as" in e["message"]]
    assert started and started[0]["run_id"] == run_id and started[0]["execution"], started

    # -- no secret anywhere -------------------------------------------------------------------
    trainer_logs = "".join(
        p.read_text(errors="replace") for p in (tmp_path / "data").rglob("*.log")
    )
    secrets = {
        "API token": token.group(0),
        "API token body": token.group(0)[3:],
        "signing key": SIGNING_KEY,
        "webhook secret": WEBHOOK_SECRET,
        "own webhook secret": OWN_HOOK_SECRET,
        "webhook URL path": HOOK_PATH.rsplit("/", 1)[1],
        "database password": PASSWORD,
    }
    places = {"server output": out, "trainer logs": trainer_logs, "responses": "\n".join(seen)}
    leaks = [
        f"{what} in {where}"
        for where, text in places.items()
        for what, value in secrets.items()
        if value in text
    ]
    # A callback token is `tpr1.<run id>.<expiry>.<signature>`: none may show, whole or signed.
    leaks += [f"a callback token in {where}" for where, text in places.items() if "tpr1." in text]
    assert not leaks, leaks
    assert trainer_logs, "the trainer wrote no log to check"
