"""Idempotency-Key on creating POSTs, including real concurrency on both databases."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func
from sqlmodel import select

from api.db import session_scope
from api.errors import Problem
from api.runs import idempotency
from api.runs.idempotency import IdempotencyKey
from api.runs.models import Run, RunCreate, RunTag
from tests.conftest import LiveServer
from trainer.contract.spec import RunSpec

SPEC = {"model_id": "google/gemma-3-4b-it", "dataset": "digits"}
BODY = {"spec": SPEC, "name": "nightly", "tags": ["ci"]}


def count_runs(engine: Engine) -> int:
    with session_scope(engine) as s:
        return int(s.exec(select(func.count()).select_from(Run)).one())


def test_same_key_same_body_gives_the_same_run(client: TestClient, engine: Engine) -> None:
    first = client.post("/api/v1/runs", json=BODY, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    # The same request, written differently (key order, defaults spelled out), is the same.
    same = {"tags": ["ci"], "name": "nightly", "notes": "", "spec": {**SPEC, "lora_r": 16}}
    again = client.post("/api/v1/runs", json=same, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert again.json() == first.json()
    assert count_runs(engine) == 1
    # Without a key, every POST is a new run.
    client.post("/api/v1/runs", json=BODY)
    client.post("/api/v1/runs", json=BODY)
    assert count_runs(engine) == 3


def test_same_key_different_body_is_a_409(client: TestClient, engine: Engine) -> None:
    client.post("/api/v1/runs", json=BODY, headers={"Idempotency-Key": "k-2"})
    r = client.post(
        "/api/v1/runs", json={**BODY, "name": "other"}, headers={"Idempotency-Key": "k-2"}
    )
    assert r.status_code == 409
    assert r.headers["content-type"] == "application/problem+json"
    assert "different request" in r.json()["detail"]
    assert count_runs(engine) == 1


def test_a_refused_request_stores_no_key(client: TestClient) -> None:
    bad = {**BODY, "spec": {**SPEC, "lora_r": 0}}
    assert (
        client.post("/api/v1/runs", json=bad, headers={"Idempotency-Key": "k-3"}).status_code == 422
    )
    ok = client.post("/api/v1/runs", json=BODY, headers={"Idempotency-Key": "k-3"})
    assert ok.status_code == 201


def test_retrain_keys(client: TestClient, engine: Engine) -> None:
    a = client.post("/api/v1/runs", json=BODY).json()["id"]
    b = client.post("/api/v1/runs", json=BODY).json()["id"]
    body = {"overrides": {"train_size": 2000}}
    first = client.post(f"/api/v1/runs/{a}/retrain", json=body, headers={"Idempotency-Key": "r"})
    again = client.post(f"/api/v1/runs/{a}/retrain", json=body, headers={"Idempotency-Key": "r"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    # One key used for another parent is another request.
    other = client.post(f"/api/v1/runs/{b}/retrain", json=body, headers={"Idempotency-Key": "r"})
    assert other.status_code == 409
    # Keys are scoped by operation: the same key on POST /runs is a fresh key.
    fresh = client.post("/api/v1/runs", json=BODY, headers={"Idempotency-Key": "r"})
    assert fresh.status_code == 201
    assert count_runs(engine) == 4


@pytest.mark.parametrize("key", ["", "x" * 201, "has space", "caf\u00e9"])
def test_malformed_key_is_a_422(client: TestClient, key: str) -> None:
    r = client.post("/api/v1/runs", json=BODY, headers={b"Idempotency-Key": key.encode()})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "header.idempotency-key"


def test_malformed_key_is_refused_by_the_service_too(engine: Engine) -> None:
    with session_scope(engine) as s, pytest.raises(Problem) as caught:
        idempotency.create_once(s, scope="x", key="a b", fingerprint="f", create=lambda: "id")
    assert caught.value.status == 422


def test_racing_requests_with_one_key_create_one_resource(engine: Engine) -> None:
    """Both requests pass the key lookup before either commits (the barrier makes sure), so
    the database's unique key decides: one commits, the other rolls back and replays."""
    racers = 2
    barrier = threading.Barrier(racers, timeout=30)
    spec = RunSpec.model_validate(SPEC)
    request = RunCreate(spec=spec, name="race", tags=["ci"])

    def attempt(_: int) -> idempotency.Outcome:
        with session_scope(engine) as s:

            def create() -> str:
                barrier.wait()  # every racer has looked the key up and found nothing
                run = Run(
                    name="race",
                    spec=spec.model_dump(mode="json"),
                    model_id=spec.model_id,
                    dataset=spec.dataset,
                    gpu_type=spec.gpu_type,
                )
                s.add(run)
                s.flush()
                s.add(RunTag(run_id=run.id, tag="ci"))
                return run.id

            return idempotency.create_once(
                s,
                scope="test.race",
                key="same-key",
                fingerprint=idempotency.request_hash(request),
                create=create,
            )

    with ThreadPoolExecutor(racers) as pool:
        outcomes = list(pool.map(attempt, range(racers)))
    assert sorted(o.created for o in outcomes) == [False, True]
    assert len({o.resource_id for o in outcomes}) == 1
    with session_scope(engine) as s:
        # The loser's run and tags were rolled back with its key.
        assert [r.id for r in s.exec(select(Run))] == [outcomes[0].resource_id]
        assert len(s.exec(select(RunTag)).all()) == 1
        assert len(s.exec(select(IdempotencyKey)).all()) == 1


def test_concurrent_http_requests_with_one_key(live_server: LiveServer, engine: Engine) -> None:
    """Real concurrency through a real server: many clients released at once."""
    clients = 8
    barrier = threading.Barrier(clients, timeout=30)

    def post(i: int) -> tuple[int, str]:
        with httpx.Client(base_url=live_server.url, timeout=60) as http:
            barrier.wait()
            r = http.post("/api/v1/runs", json=BODY, headers={"Idempotency-Key": "http-key"})
            body: dict[str, Any] = r.json()
            return r.status_code, body.get("id", r.text)

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(post, range(clients)))
    assert Counter(code for code, _ in results) == {201: 1, 200: clients - 1}, results
    assert len({run_id for _, run_id in results}) == 1
    assert count_runs(engine) == 1
