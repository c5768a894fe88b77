"""What the webhook tests share: a running api to trigger and finish runs in, and a real HTTP
server on loopback for a receiver's handler."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.config import Settings
from api.db import make_engine, migrate
from api.main import create_app


@dataclass
class World:
    client: TestClient
    engine: Engine
    settings: Settings


@pytest.fixture
def make_world(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., World]]:
    """An api per call, its keyword arguments the settings; all are stopped after the test."""
    made: list[tuple[TestClient, Engine]] = []

    def _make(**settings: Any) -> World:
        config = make_settings(**settings)
        engine = make_engine(config.db_url)
        migrate(engine)
        client = TestClient(create_app(config)).__enter__()
        made.append((client, engine))
        return World(client, engine, config)

    yield _make
    for client, engine in made:
        client.__exit__(None, None, None)
        engine.dispose()


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """`handler` answering on a loopback port (yielded) until the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
