"""Body limits on every endpoint (api/errors.py BodyLimit), against a real server over a raw
socket: a 50 MB body is a 413 whether it declares its length or streams in chunks, and the
server answers while the body is still arriving, having read about its limit, never the 50 MB
(the client stops sending once the answer is there and counts what it sent)."""

from __future__ import annotations

import re
import select
import socket
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.config import Settings
from tests.api.factories import insert_runs, token_for
from tests.conftest import LiveServer

FIFTY_MB = 50 * 1024 * 1024
CHUNK = 64 * 1024
# What may be in flight when the answer comes: socket buffers on both sides and the server's
# read-ahead. Far below 50 MB; a server that read the whole body first would exceed it.
IN_FLIGHT = 16 * 1024 * 1024


def body_operations(client: TestClient) -> list[tuple[str, str, bool]]:
    """Every POST, PUT and PATCH of the OpenAPI document, and whether it reads a body (the
    callback route reads its raw body, so it declares none). One that reads none may answer
    without reading; it must still answer while the body streams."""
    doc = client.get("/openapi.json").json()
    ops = [
        (m.upper(), path, "requestBody" in op or path.endswith("/events"))
        for path, item in doc["paths"].items()
        for m, op in item.items()
        if m in ("post", "put", "patch")
    ]
    assert sum(reads for *_, reads in ops) >= 8, ops
    return ops


def concrete(path: str, run_id: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: run_id if m.group(1) == "run_id" else "pets", path)


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    headers = {"Content-Type": "application/json", **headers}
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_streaming(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, int]:
    """Send up to 50 MB chunked; stop as soon as an answer arrives. (status, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    sent = 0
    chunk = f"{CHUNK:x}\r\n".encode() + b"[" * CHUNK + b"\r\n"
    try:
        sock.sendall(_head(method, path, {**headers, "Transfer-Encoding": "chunked"}))
        deadline = time.monotonic() + 120
        while sent < FIFTY_MB:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                break
            if writable:
                try:
                    sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += CHUNK
            assert time.monotonic() < deadline, "no answer"
        answer = sock.recv(4096)
    finally:
        sock.close()
    return int(answer.split(b" ", 2)[1]), sent


def send_declared(port: int, method: str, path: str, headers: dict[str, str], length: str) -> int:
    """Declare `length` and send nothing: the answer must come from the header alone."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(_head(method, path, {**headers, "Content-Length": length}))
        return int(sock.recv(4096).split(b" ", 2)[1])


@pytest.fixture
def run_and_token(engine: Engine, settings: Settings) -> tuple[str, str]:
    (run_id,) = insert_runs(engine)
    return run_id, token_for(settings, run_id)


def test_every_body_is_limited_while_it_streams(
    client: TestClient, live_server: LiveServer, run_and_token: tuple[str, str]
) -> None:
    run_id, token = run_and_token
    wrong = []
    for method, template, reads in body_operations(client):
        path = concrete(template, run_id)
        # The callback route authenticates first: give it the run's credential.
        headers = {"Authorization": f"Bearer {token}"} if path.endswith("/events") else {}
        status, sent = send_streaming(live_server.port, method, path, headers)
        if (status != 413 if reads else status >= 500) or sent > IN_FLIGHT:
            wrong.append(f"{method} {template}: {status} after {sent:,} bytes (chunked)")
        for length in (str(FIFTY_MB), "9" * 5000):
            status = send_declared(live_server.port, method, path, headers, length)
            # 5000 digits: uvicorn's parser may refuse the request line itself (400).
            if status not in ((413,) if length == str(FIFTY_MB) else (400, 413)):
                wrong.append(f"{method} {template}: {status} for Content-Length {length[:12]}")
    assert not wrong, "\n".join(wrong)


def test_dashboard_forms_are_limited_too(
    client: TestClient, live_server: LiveServer, run_and_token: tuple[str, str]
) -> None:
    run_id, _ = run_and_token
    for path in ["/runs/new", "/templates/_new", f"/runs/{run_id}/cancel", "/login"]:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        status, sent = send_streaming(live_server.port, "POST", path, form)
        assert status == 413 and sent <= IN_FLIGHT, (path, status, sent)
