"""200 concurrent requests against a real `tuneplane serve` (the default pool and slots), on
SQLite and PostgreSQL: every request answered 2xx, the right number of runs, and nothing in the
server's log about locks, the pool or a 500 (api/db.py says why this used to deadlock). Counts
and codes are asserted, never durations; the figures are printed for the README (-s)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, text
from sqlmodel import Session, select

from api.auth.callback import mint_token
from api.runs.models import Run
from api.runs.states import RunStatus
from tests.api.factories import insert_runs
from tests.faults.burst import Answer, burst, figure
from tests.faults.serve import Serve
from tests.runs_client import HANG_GUARD_S

CLIENTS = 200
SPEC = {"model_id": "google/gemma-3-4b-it", "dataset": "digits", "train_size": 8}


@pytest.fixture
def served(tmp_path: Path, db_url: str, engine: Engine) -> Iterator[Serve]:
    # A slot wait longer than the hang guard: no 503 can come from slow progress, so every
    # request must get its 2xx however loaded the machine is.
    with Serve(tmp_path / "data", db_url, run_worker="false", db_wait_seconds="600") as server:
        yield server


def _runs(engine: Engine) -> int:
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(Run)).one()


def _clean(served: Serve, answers: list[Answer]) -> None:
    assert served.faults_in_log() == [], "\n".join(served.faults_in_log()[:20])
    assert all(a.status < 300 for a in answers), Counter(a.status for a in answers)


def test_200_concurrent_creations_with_distinct_keys_make_200_runs(
    served: Serve, engine: Engine, db_kind: str
) -> None:
    async def create(c: httpx.AsyncClient, i: int) -> httpx.Response:
        return await c.post(
            "/api/v1/runs", json={"spec": SPEC}, headers={"Idempotency-Key": f"k-{i}"}
        )

    answers, wall = burst(served.url, CLIENTS, create)
    figure(f"{db_kind} create distinct keys", answers, wall)
    _clean(served, answers)
    assert Counter(a.status for a in answers) == {201: CLIENTS}
    assert len({a.body["id"] for a in answers}) == CLIENTS  # type: ignore[index]
    assert _runs(engine) == CLIENTS


def test_200_concurrent_creations_with_one_key_make_one_run(
    served: Serve, engine: Engine, db_kind: str
) -> None:
    async def create(c: httpx.AsyncClient, i: int) -> httpx.Response:
        return await c.post("/api/v1/runs", json={"spec": SPEC}, headers={"Idempotency-Key": "one"})

    answers, wall = burst(served.url, CLIENTS, create)
    figure(f"{db_kind} create one key", answers, wall)
    _clean(served, answers)
    # One made it; every other one is told so, with the same run.
    assert Counter(a.status for a in answers) == {201: 1, 200: CLIENTS - 1}
    assert all(a.headers.get("Idempotent-Replayed") == "true" for a in answers if a.status == 200)
    assert len({a.body["id"] for a in answers}) == 1  # type: ignore[index]
    assert _runs(engine) == 1


def test_200_concurrent_reads_all_answer(served: Serve, engine: Engine, db_kind: str) -> None:
    insert_runs(engine, 60, status=RunStatus.queued)  # a full page of 50 to read, and more

    async def read(c: httpx.AsyncClient, i: int) -> httpx.Response:
        return await c.get("/api/v1/runs", params={"limit": 50})

    answers, wall = burst(served.url, CLIENTS, read)
    figure(f"{db_kind} list runs", answers, wall)
    _clean(served, answers)
    assert Counter(a.status for a in answers) == {200: CLIENTS}
    pages = {tuple(r["id"] for r in a.body["items"]) for a in answers}  # type: ignore[index]
    assert len(pages) == 1 and len(next(iter(pages))) == 50


def test_deliberate_overload_is_a_503_with_retry_after(
    tmp_path: Path, db_url: str, engine: Engine, db_kind: str
) -> None:
    """Two slots, a one-second wait, and the runs table locked by another session: the two
    requests holding the slots wait on the lock, every other one gets a 503 with Retry-After
    (never a 500, never a timeout), and once the lock goes the two are answered."""
    if db_kind != "postgresql":
        # SQLite's only lock that stalls a request is its write lock, which a request waits on
        # for busy_timeout (30 s) and then fails; that is a race with the machine's speed.
        pytest.skip("PostgreSQL only: a table lock holds requests for as long as the test says")
    with (
        Serve(
            tmp_path / "data", db_url, run_worker="false", db_pool_size="2", db_wait_seconds="1"
        ) as server,
        engine.connect() as holder,
    ):
        holder.execute(text("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE"))
        answered = threading.Semaphore(0)

        async def read(c: httpx.AsyncClient, i: int) -> httpx.Response:
            r = await c.get("/api/v1/runs")
            answered.release()
            return r

        result: list[tuple[list[Answer], float]] = []
        client = threading.Thread(target=lambda: result.append(burst(server.url, CLIENTS, read)))
        client.start()
        for _ in range(CLIENTS - 2):  # every request but the two that hold the slots
            assert answered.acquire(timeout=HANG_GUARD_S), "the overloaded server hung"
        holder.rollback()  # the lock goes; the two slot holders finish
        client.join(HANG_GUARD_S)
        [(answers, wall)] = result
    figure(f"{db_kind} overload (2 slots, 1 s wait)", answers, wall)
    assert Counter(a.status for a in answers) == {503: CLIENTS - 2, 200: 2}
    busy = [a for a in answers if a.status == 503]
    assert all(a.headers.get("Retry-After") == "2" for a in busy)
    assert all(a.body["title"] == "Server busy" for a in busy)  # type: ignore[index]
    assert server.faults_in_log() == []


def test_concurrent_callbacks_beyond_the_slots_are_all_taken(
    tmp_path: Path, db_url: str, engine: Engine, db_kind: str
) -> None:
    """More concurrent callbacks than slots queue for them and are all taken. The callback
    routes take a slot only around their database work; when `authorize` (every /api/v1 route)
    still held one for the whole request, taking the second deadlocked every slot once more
    callbacks than slots arrived together."""
    key = "k" * 40
    run_ids = insert_runs(engine, CLIENTS, status=RunStatus.running)
    expires = datetime.now(UTC) + timedelta(hours=1)
    tokens = {r: mint_token(key.encode(), r, expires) for r in run_ids}

    async def report(c: httpx.AsyncClient, i: int) -> httpx.Response:
        run_id = run_ids[i]
        event = {
            "id": f"ev-{i}",
            "run_id": run_id,
            "seq": 1,
            "type": "progress",
            "time": datetime.now(UTC).isoformat(),
            "data": {"step": 1, "total_steps": 2, "epoch": 0.5, "loss": 1.0},
        }
        headers = {"Authorization": f"Bearer {tokens[run_id]}"}
        return await c.post(f"/api/v1/runs/{run_id}/events", json=event, headers=headers)

    # A few slots and a wait longer than the hang guard: a deadlock is a hang, never a 503.
    with Serve(
        tmp_path / "data",
        db_url,
        run_worker="false",
        db_pool_size="4",
        db_wait_seconds="600",
        callback_signing_key=key,
    ) as served:
        answers, wall = burst(served.url, CLIENTS, report)
        figure(f"{db_kind} callbacks on 4 slots", answers, wall)
        _clean(served, answers)
    assert Counter(a.status for a in answers) == {201: CLIENTS}
