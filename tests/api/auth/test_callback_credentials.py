"""Malformed callback credentials (api/auth/callback.py) are 401s, never 500s, and the credential
is checked before the body: an unauthenticated caller's malformed body is a 401, not a 422."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.auth.callback import _signature
from api.config import Settings
from tests.api.factories import insert_runs, token_for


def _url(run_id: str) -> str:
    return f"/api/v1/runs/{run_id}/events"


@pytest.mark.parametrize(
    "expiry",
    [
        "9" * 5000,  # int() refuses over 4300 digits
        "1" * 13,
        "²³",  # str.isdigit says yes, int() says no
        "\u0661\u0667" + "\u0660" * 8,  # Arabic-Indic digits: int() reads them
        "-1",
        "",
        "1e9",
    ],
)
def test_a_malformed_expiry_is_401(
    client: TestClient, engine: Engine, settings: Settings, expiry: str
) -> None:
    (run_id,) = insert_runs(engine)
    signature = _signature(settings.signing_key, run_id, 1) if expiry.isascii() else "x"
    header = f"Bearer tpr1.{run_id}.{expiry}.{signature}"
    # Latin-1 where it can be: the server decodes header bytes as Latin-1, so "²" arrives as "²".
    raw = header.encode("latin-1") if all(ord(c) < 256 for c in header) else header.encode()
    r = client.post(_url(run_id), content=b"{}", headers={"Authorization": raw})  # type: ignore[dict-item]
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer tpr1",
        "Bearer tpr1....",
        "Bearer tpr1.run.1.",
        "Bearer " + "tpr1." * 2000,
        "Bearer \x00\x01",
        "Bearer tpr1.r\u00fcn.123.abc",
        "Bearer eyJhbGciOiJSUzI1NiJ9.garbage.garbage",
        "Token abc",
        "Bearer",
    ],
)
def test_garbage_credentials_are_401(
    client: TestClient, engine: Engine, authorization: str
) -> None:
    (run_id,) = insert_runs(engine)
    r = client.post(
        _url(run_id),
        content=b"{}",
        headers={"Authorization": authorization.encode("utf-8")},  # type: ignore[dict-item]
    )
    assert r.status_code == 401, (authorization[:40], r.status_code, r.text[:200])


@pytest.mark.parametrize(
    "body",
    [b"not json", b"{" * 100_000, b'{"type": "no-such-event"}', "\u00e9\u00e8".encode(), b""],
)
def test_a_malformed_body_without_a_credential_is_401_not_422(
    client: TestClient, engine: Engine, settings: Settings, body: bytes
) -> None:
    (run_id,) = insert_runs(engine)
    for headers in ({}, {"Authorization": "Bearer tpr1.x.1.y"}):
        r = client.post(_url(run_id), content=body, headers=headers)
        assert r.status_code == 401, r.text
    # With the run's own token the same body is judged on its content.
    own = {"Authorization": f"Bearer {token_for(settings, run_id)}"}
    assert client.post(_url(run_id), content=body, headers=own).status_code in (400, 413, 422)
