"""GET /api/v1/runs: filters, newest first, cursors that stay stable while runs are added."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.db import session_scope
from api.runs.models import Run
from api.runs.states import RunStatus
from api.runs.status import set_status

SPEC = {"model_id": "google/gemma-3-4b-it", "dataset": "digits"}


def create(client: TestClient, **body: Any) -> str:
    spec = {**SPEC, **body.pop("spec", {})}
    r = client.post("/api/v1/runs", json={"spec": spec, **body})
    assert r.status_code == 201, r.text
    run_id: str = r.json()["id"]
    return run_id


def ids(page: dict[str, Any]) -> list[str]:
    return [r["id"] for r in page["items"]]


def walk(client: TestClient, query: str, limit: int) -> list[str]:
    out: list[str] = []
    cursor = None
    while True:
        url = f"/api/v1/runs?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url).json()
        out += ids(page)
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def test_newest_first_with_filters(client: TestClient, engine: Engine) -> None:
    a = create(client, tags=["team:vision", "nightly"])
    b = create(
        client,
        spec={"model_id": "google/gemma-3-12b-it", "gpu_type": "nvidia-rtx-pro-6000"},
        tags=["nightly"],
    )
    c = create(client, tags=["team:vision"])
    with session_scope(engine) as s:
        run = s.get(Run, b)
        assert run is not None
        set_status(s, run, RunStatus.dispatched)
        s.commit()

    assert ids(client.get("/api/v1/runs").json()) == [c, b, a]
    assert ids(client.get("/api/v1/runs?status=queued").json()) == [c, a]
    assert ids(client.get("/api/v1/runs?status=queued&status=dispatched").json()) == [c, b, a]
    assert ids(client.get("/api/v1/runs?model=google/gemma-3-12b-it").json()) == [b]
    assert ids(client.get("/api/v1/runs?tag=nightly").json()) == [b, a]
    # Several tags: runs that have all of them.
    assert ids(client.get("/api/v1/runs?tag=nightly&tag=team:vision").json()) == [a]
    assert ids(client.get("/api/v1/runs?tag=nightly&status=queued").json()) == [a]
    assert client.get("/api/v1/runs?model=nobody").json() == {"items": [], "next_cursor": None}
    assert client.get("/api/v1/runs?tag=nightly").json()["items"][0]["tags"] == ["nightly"]


def test_cursor_pages_are_stable_while_runs_are_added(client: TestClient) -> None:
    made = [create(client, tags=["x"]) for _ in range(7)]
    newest_first = made[::-1]
    assert walk(client, "", 3) == newest_first
    assert walk(client, "&tag=x", 2) == newest_first
    # An empty cursor is the first page.
    assert ids(client.get("/api/v1/runs?limit=2&cursor=").json()) == newest_first[:2]

    first = client.get("/api/v1/runs?limit=3").json()
    assert ids(first) == newest_first[:3]
    # Runs submitted between two page fetches land before the cursor: the pages a client is
    # walking neither repeat nor skip a run.
    create(client)
    create(client)
    second = client.get(f"/api/v1/runs?limit=3&cursor={first['next_cursor']}").json()
    assert ids(second) == newest_first[3:6]
    third = client.get(f"/api/v1/runs?limit=3&cursor={second['next_cursor']}").json()
    assert ids(third) == newest_first[6:] and third["next_cursor"] is None


def test_runs_created_in_the_same_instant_are_ordered_by_id(
    client: TestClient, engine: Engine
) -> None:
    made = [create(client) for _ in range(5)]
    with session_scope(engine) as s:
        first = s.get(Run, made[0])
        assert first is not None
        for run_id in made[1:]:
            run = s.get(Run, run_id)
            assert run is not None
            run.created_at = first.created_at
            s.add(run)
        s.commit()
    assert walk(client, "", 2) == sorted(made, reverse=True)


def cursor_of(created: str) -> str:
    return base64.urlsafe_b64encode(f'["{created}","x"]'.encode()).decode()


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("cursor=nonsense", "query.cursor"),
        ("cursor=" + base64.urlsafe_b64encode(b'["yesterday", "run_x"]').decode(), "query.cursor"),
        ("cursor=" + base64.urlsafe_b64encode(b"[1]").decode(), "query.cursor"),
        ("cursor=" + base64.urlsafe_b64encode(b'{"a": 1}').decode(), "query.cursor"),
        ("cursor=" + "A" * 500, "query.cursor"),
        # Valid ISO times whose UTC value is out of datetime's range (an OverflowError).
        ("cursor=" + cursor_of("9999-12-31T23:59:59-23:59"), "query.cursor"),
        ("cursor=" + cursor_of("0001-01-01T00:00:00+14:00"), "query.cursor"),
        ("limit=0", "query.limit"),
        ("limit=201", "query.limit"),
        ("limit=ten", "query.limit"),
        ("status=finished", "query.status.0"),
        ("tag=has%20space", "query.tag.0"),
        ("model=a%00b", "query.model"),
    ],
)
def test_bad_query_is_a_422_problem(client: TestClient, query: str, field: str) -> None:
    r = client.get(f"/api/v1/runs?{query}")
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["field"] == field
