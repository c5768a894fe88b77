"""`tuneplane serve`'s access log: every request, except the trainers' accepted callbacks (a
sweep posts hundreds a second, and /metrics counts them); `TUNEPLANE_ACCESS_LOG=false` turns it
off altogether."""

from __future__ import annotations

from pathlib import Path

import httpx
from sqlalchemy import Engine

from api.config import Settings
from tests.api.factories import insert_runs, token_for
from tests.faults.serve import Serve

KEY = "access-log-signing-key-0123456789abcdef"


def _serve_and_post(
    tmp_path: Path, db_url: str, engine: Engine, **settings: str
) -> tuple[str, str]:
    """The server's output after a callback it takes, one it refuses, and a GET of the run."""
    (run_id,) = insert_runs(engine, 1)
    token = token_for(Settings(callback_signing_key=KEY, data_dir=tmp_path), run_id)
    bearer = {"Authorization": f"Bearer {token}"}
    server = Serve(
        tmp_path / "data", db_url, run_worker="false", callback_signing_key=KEY, **settings
    )
    with server:
        event = {"type": "progress", "id": "e-1", "run_id": run_id, "seq": 1}
        event["data"] = {"step": 1, "total_steps": 2, "epoch": 0.5}
        url = f"{server.url}/api/v1/runs/{run_id}/events"
        taken = httpx.post(url, json=event, headers=bearer)
        assert taken.status_code == 201, taken.text
        batch = httpx.post(url + ":batch", json={"events": [event]}, headers=bearer)
        assert batch.status_code == 200, batch.text
        assert httpx.post(url, json=event, headers={"Authorization": "Bearer x"}).status_code == 401
        assert httpx.get(f"{server.url}/api/v1/runs/{run_id}").status_code == 200
    return server.log(), run_id


def test_accepted_callbacks_are_left_out_of_the_access_log(
    tmp_path: Path, db_url: str, engine: Engine
) -> None:
    out, run_id = _serve_and_post(tmp_path, db_url, engine)
    access = [line for line in out.splitlines() if " HTTP/1.1" in line]
    assert any(f'"GET /api/v1/runs/{run_id} HTTP/1.1" 200' in line for line in access), out
    assert any(f'"POST /api/v1/runs/{run_id}/events HTTP/1.1" 401' in line for line in access)
    assert not [line for line in access if '/events HTTP/1.1" 201' in line], out
    assert not [line for line in access if "/events:batch HTTP/1.1" in line], out


def test_the_access_log_can_be_turned_off(tmp_path: Path, db_url: str, engine: Engine) -> None:
    out, _ = _serve_and_post(tmp_path, db_url, engine, access_log="false")
    assert "HTTP/1.1" not in out, out
    assert "Application startup complete" in out  # the rest of the log is still there
