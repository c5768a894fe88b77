"""Fixtures shared by the whole suite: real databases, a real app, a real server, the tiny model.

`--db sqlite` (default), `--db postgresql` or `--db all`: every test that uses `engine` (and so
`app`, `client`, `live_server`) runs once per database. PostgreSQL tests each get a schema of
their own, so they can run in parallel and leave nothing behind. `.ci/run` passes `--db all`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text

from api.config import Settings
from api.db import make_engine, migrate
from api.main import create_app

# One CPU thread per process, for this process and every trainer it starts (they inherit it):
# CI runs two test workers on two cores, and torch's default of a thread per core in each
# process oversubscribes them; OpenMP's spinning threads then make a CPU run several times
# slower (two 4-epoch digits runs side by side: 64 s each with one thread, 448 s with the
# default), and the tests' time limits run out.
os.environ.setdefault("OMP_NUM_THREADS", "1")

PG_URL = os.environ.get("TUNEPLANE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        default="sqlite",
        choices=["sqlite", "postgresql", "all"],
        help="database(s) the api tests run against",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_kind" in metafunc.fixturenames:
        choice = metafunc.config.getoption("--db")
        kinds = ["sqlite", "postgresql"] if choice == "all" else [choice]
        metafunc.parametrize("db_kind", kinds, scope="function")


@pytest.fixture
def db_url(db_kind: str, tmp_path: Path) -> Iterator[str]:
    if db_kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'tuneplane.db'}"
        return
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    # libpq's `options` puts every connection of this test in its own schema.
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def make_settings(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, db_url: str
) -> Callable[..., Settings]:
    """Settings for a test: its own data directory and database; no worker unless asked for."""

    def _make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "database_url": db_url,
            "run_worker": False,
            "hub_url": "",  # no network: tests check local model directories or a local server
            # Runs may name files anywhere under pytest's temporary directory (the tiny model and
            # generated data sets live beside the data directory); tests/api/runs/
            # test_local_paths.py sets its own roots.
            "local_data_roots": [tmp_path_factory.getbasetemp()],
        }
        values.update(overrides)
        return Settings(**values)

    return _make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    eng = make_engine(settings.db_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def app(settings: Settings, engine: Engine) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LiveServer:
    """uvicorn serving an app on a free loopback port, in a thread of the test process."""

    def __init__(self, app: FastAPI, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120  # a hang guard: a loaded machine starts slowly
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[LiveServer]:
    server = LiveServer(app).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Gemma 3 checkpoint, built once per test session (worker)."""
    from trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gemma3")
