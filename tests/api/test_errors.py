"""Every error is an RFC 9457 problem document, whatever produced it."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.deps import SessionDep
from api.errors import invalid
from tests.conftest import LiveServer

PROBLEM = "application/problem+json"


def test_unknown_path_is_a_404_problem(client: TestClient) -> None:
    r = client.get("/api/v1/nothing-here")
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    assert r.json() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "instance": "/api/v1/nothing-here",
    }


def test_wrong_method_is_a_405_problem_with_allow(client: TestClient) -> None:
    r = client.delete("/api/v1/runs")
    assert r.status_code == 405 and r.headers["content-type"] == PROBLEM
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert "DELETE is not allowed here" in r.json()["detail"]


def test_unexpected_errors_are_a_500_problem_without_internals(app: FastAPI) -> None:
    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500 and r.headers["content-type"] == PROBLEM
    assert "secret internals" not in r.text
    assert r.json()["title"] == "Internal Server Error"


def test_oversized_streamed_body_is_a_413_problem(client: TestClient) -> None:
    """No Content-Length (a streamed body): the limit is enforced while the body comes in."""

    def chunks() -> Iterator[bytes]:
        for _ in range(8):  # 512 KiB, twice the limit of this endpoint
            yield b" " * 65536

    r = client.post("/api/v1/runs", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
    assert "262,144 bytes" in r.json()["detail"]


def test_bad_content_length_is_a_problem(live_server: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /api/v1/runs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 99999999999\r\nConnection: close\r\n\r\n{}"
        )
        response = b""
        while data := sock.recv(65536):
            response += data
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"application/problem+json" in response


def test_a_value_the_database_refuses_is_a_422_not_a_500(app: FastAPI, db_kind: str) -> None:
    if db_kind != "postgresql":
        pytest.skip("SQLite stores any value in any column")

    @app.get("/cast")
    def cast(session: SessionDep) -> None:
        session.execute(text("SELECT CAST(:v AS integer)"), {"v": str(2**40)})

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/cast")
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert "out of the range" in r.json()["detail"]


def test_one_field_problem_says_the_same_in_detail_and_errors() -> None:
    # The one way a 422 for a single field is built (templates, local paths, tokens, queries).
    problem = invalid("body.webhooks.0.url", "is refused", "Path outside the data roots")
    assert (problem.status, problem.title) == (422, "Path outside the data roots")
    assert problem.detail == "body.webhooks.0.url: is refused"
    assert problem.extra == {"errors": [{"field": "body.webhooks.0.url", "message": "is refused"}]}
