"""/healthz and /readyz against real databases: ready, unmigrated, unreachable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.config import Settings
from api.db import make_engine, migrate
from api.main import create_app
from tests.conftest import PG_URL, free_port


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_ready_when_migrated(client: TestClient, engine: Engine) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    assert r.json()["database"] == engine.dialect.name


def test_not_ready_before_migrations(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/problem+json"
        assert "migration none" in r.json()["detail"]
        # Alive all the same: liveness is not readiness.
        assert c.get("/healthz").status_code == 200
    migrate(engine := make_engine(settings.db_url))
    engine.dispose()
    with TestClient(create_app(settings)) as c:
        assert c.get("/readyz").status_code == 200


def test_not_ready_when_the_database_is_unreachable(make_settings: Callable[..., Any]) -> None:
    # A PostgreSQL URL whose port nothing listens on.
    dead = PG_URL.replace("5432", str(free_port())) + "?connect_timeout=2"
    with TestClient(create_app(make_settings(database_url=dead))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["title"] == "Database unreachable"
        assert "postgresql" in r.json()["detail"]
        assert r.headers["retry-after"].isdigit()
        # Anyone may ask /readyz: the answer names neither the host nor the port.
        port = dead.split(":")[-1].split("/")[0]
        assert port not in r.text and "127.0.0.1" not in r.text, r.text
        # /metrics still answers, and says the database is down.
        m = c.get("/metrics")
        assert m.status_code == 200 and "tuneplane_database_up 0.0" in m.text
