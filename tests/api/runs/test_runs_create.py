"""POST /api/v1/runs: validation with field paths, estimates and refusals, what is stored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import select

from api.db import session_scope
from api.main import create_app
from api.runs.models import Run, RunTag

SPEC = {"model_id": "google/gemma-3-4b-it", "dataset": "digits"}


def post(client: TestClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/api/v1/runs", json=body, headers=headers)


def test_create_returns_201_location_and_the_run(client: TestClient, engine: Engine) -> None:
    r = post(client, {"spec": SPEC, "name": "pets", "tags": ["a", "b", "a"], "notes": "n"})
    assert r.status_code == 201, r.text
    run = r.json()
    assert r.headers["location"] == f"/api/v1/runs/{run['id']}"
    assert run["status"] == "queued"
    assert (run["name"], run["notes"], run["tags"]) == ("pets", "n", ["a", "b"])
    # Every spec field is stored, defaults included, so a later default change changes nothing.
    assert run["spec"]["train_size"] == 1000 and run["spec"]["gpu_type"] == "nvidia-l4"
    assert run["model_id"] == SPEC["model_id"] and run["dataset"] == "digits"
    assert client.get(r.headers["location"]).json() == run
    with session_scope(engine) as s:
        stored = s.get(Run, run["id"])
        assert stored is not None and stored.spec["lora_r"] == 16
        tags = s.exec(select(RunTag.tag).where(RunTag.run_id == run["id"])).all()
        assert sorted(tags) == ["a", "b"]


def test_estimate_is_stored_on_the_run(client: TestClient) -> None:
    run = post(client, {"spec": {**SPEC, "gpu_type": "nvidia-rtx-pro-6000"}}).json()
    est = run["estimate"]
    assert est["fits"] is True and est["architecture"] == "gemma-3-4b"
    assert 4.0e9 < est["parameters"] < 4.6e9
    assert est["memory"]["total_gib"] < est["memory"]["gpu_gib"]
    assert est["time"]["segments"] == 1 and est["cost_usd"] > 0


def test_a_spec_that_cannot_fit_its_gpu_is_refused_with_the_breakdown(
    client: TestClient, engine: Engine
) -> None:
    # 12B at batch 32 needs about 26 GiB (at the default batch 8 it fits an L4's 22 GiB).
    spec = {**SPEC, "model_id": "google/gemma-3-12b-it", "gpu_type": "nvidia-l4", "batch_size": 32}
    r = post(client, {"spec": spec})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["title"] == "Run does not fit the GPU"
    assert problem["estimate"]["fits"] is False
    memory = problem["estimate"]["memory"]
    assert memory["total_gib"] > memory["gpu_gib"] == 22.0
    assert {"weights_gib", "adapters_gib", "activations_gib", "logits_gib"} <= set(memory)
    # It says what would fit instead.
    assert "nvidia-rtx-pro-6000" in problem["detail"] and "batch_size" in problem["detail"]
    assert problem["errors"][0]["field"] == "body.spec.gpu_type"
    with session_scope(engine) as s:
        assert s.exec(select(Run)).first() is None
    # The same model on the 96 GB card is accepted.
    assert post(client, {"spec": {**spec, "gpu_type": "nvidia-rtx-pro-6000"}}).status_code == 201


def test_a_segment_too_short_to_load_the_model_is_refused_on_its_budget(
    make_settings: Any, engine: Engine
) -> None:
    spec = {**SPEC, "model_id": "google/gemma-3-27b-it", "gpu_type": "nvidia-rtx-pro-6000"}
    with TestClient(create_app(make_settings())) as c:
        r = post(c, {"spec": {**spec, "time_budget_minutes": 2}})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == "body.spec.time_budget_minutes"
        assert "is shorter than loading the model" in r.json()["detail"]
        # Under the server's own cap (a demo's) it is said, not refused: the operator chose it.
    with TestClient(create_app(make_settings(segment_seconds_max=60))) as c:
        r = post(c, {"spec": spec})
        assert r.status_code == 201, r.text
        assert r.json()["estimate"]["time"]["segments"] == 0
        notes = " ".join(r.json()["estimate"]["notes"])
        assert "(the server caps segments at that length)" in notes


def test_a_model_of_unknown_size_is_never_refused(client: TestClient, tmp_path: Any) -> None:
    r = post(client, {"spec": {**SPEC, "model_id": str(tmp_path / "my-model")}})
    assert r.status_code == 201
    est = r.json()["estimate"]
    assert est["fits"] is None and est["parameters"] is None and est["memory"] is None
    assert "unknown" in est["notes"][0]


def test_gpu_type_defaults_to_the_setting(make_settings: Any, engine: Engine) -> None:
    app = create_app(make_settings(default_gpu_type="nvidia-rtx-pro-6000"))
    with TestClient(app) as c:
        assert post(c, {"spec": SPEC}).json()["spec"]["gpu_type"] == "nvidia-rtx-pro-6000"
        named = post(c, {"spec": {**SPEC, "gpu_type": "nvidia-l4"}}).json()
        assert named["spec"]["gpu_type"] == "nvidia-l4"


@pytest.mark.parametrize(
    ("dispatcher", "long_tasks", "segment_minutes"),
    [("local", False, 720), ("cloudrun", False, 55), ("cloudrun", True, 715)],
)
def test_the_estimate_counts_the_segments_the_dispatcher_will_run(
    make_settings: Any, engine: Engine, dispatcher: str, long_tasks: bool, segment_minutes: int
) -> None:
    """A 720-minute budget is one segment locally, but a Cloud Run GPU task runs at most 1 hour
    (12 with long GPU tasks) and the worker cuts the budget into segments of that cap less the
    5-minute margin: the estimate counts those segments, each loading the model again."""
    settings = make_settings(
        dispatcher=dispatcher,
        cloud_run_long_gpu_tasks=long_tasks,
        callback_signing_key="k" * 32,
        public_url="https://api.example",
    )
    spec = {
        **SPEC,
        "model_id": "google/gemma-3-27b-it",
        "gpu_type": "nvidia-rtx-pro-6000",
        "train_size": 3600,
    }
    with TestClient(create_app(settings)) as c:
        times = {
            minutes: post(c, {"spec": {**spec, "time_budget_minutes": minutes}}).json()["estimate"]
            for minutes in (720, segment_minutes)
        }
    long, capped = times[720], times[segment_minutes]
    assert long["time"]["segment_seconds"] == segment_minutes * 60
    # The same run as one whose own budget is the cap: as many executions, as many loads.
    assert long["time"] == capped["time"] and long["cost_usd"] == capped["cost_usd"]
    assert (long["time"]["segments"] > 3) == (segment_minutes == 55)
    if segment_minutes == 55:
        assert "needs" in " ".join(long["notes"]) and "at most 55 min" in " ".join(long["notes"])


@pytest.mark.parametrize(
    ("spec_change", "field", "message"),
    [
        ({"lora_r": 0}, "body.spec.lora_r", "must be between 1 and 1024 (got 0)"),
        ({"learning_rate": 5}, "body.spec.learning_rate", "must be between 1e-08 and 1"),
        ({"train_size": "many"}, "body.spec.train_size", "valid integer"),
        ({"dataset": "mnist"}, "body.spec.dataset", "unknown data set 'mnist'"),
        ({"gpu_type": "a100"}, "body.spec.gpu_type", "'nvidia-l4' or 'nvidia-rtx-pro-6000'"),
        ({"epochs": 3}, "body.spec.epochs", "unknown field; the spec's fields are: model_id"),
        ({"model_id": None}, "body.spec.model_id", "valid string"),
    ],
)
def test_spec_errors_name_the_field_path_and_the_range(
    client: TestClient, spec_change: dict[str, Any], field: str, message: str
) -> None:
    r = post(client, {"spec": {**SPEC, **spec_change}})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    errors = r.json()["errors"]
    assert [e["field"] for e in errors] == [field]
    assert message in errors[0]["message"]
    assert message in r.json()["detail"]


def test_every_error_is_reported_at_once(client: TestClient) -> None:
    r = post(client, {"spec": {"lora_r": 0}, "tags": ["no spaces"], "colour": 1})
    fields = {e["field"]: e["message"] for e in r.json()["errors"]}
    assert fields["body.spec.model_id"] == "is required"
    assert fields["body.spec.dataset"] == "is required"
    assert fields["body.spec.lora_r"].startswith("must be between 1 and 1024")
    assert "bad tag 'no spaces'" in fields["body.tags"]
    assert fields["body.colour"] == "unknown field"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"spec": SPEC, "name": "a\x00b"}, "body.name"),
        ({"spec": {**SPEC, "dataset": "imagefolder:/d\x00ta"}}, "body.spec.dataset"),
        ({"spec": SPEC, "notes": "\ud800"}, "body.notes"),
    ],
)
def test_text_no_database_can_store_is_a_422(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    # json.dumps escapes what the client library would refuse to encode (a lone surrogate).
    raw = json.dumps(body).encode()
    r = client.post("/api/v1/runs", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field


def test_body_errors_are_problems(client: TestClient) -> None:
    r = client.post(
        "/api/v1/runs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["errors"][0]["message"].startswith("not valid JSON")
    r = client.post("/api/v1/runs", content=b"spec=1", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = client.post("/api/v1/runs", content=b'{"spec": {}}')  # no Content-Type at all
    assert r.status_code == 415
    r = client.post(
        "/api/v1/runs", content=b" " * 300_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    r = client.post("/api/v1/runs", json=[1, 2])
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"
    r = client.post("/api/v1/runs", content=b"NaN", headers={"content-type": "application/json"})
    assert r.status_code == 422
    # Python's json reads NaN and Infinity; no JSON column could store them.
    for number in (b"Infinity", b"NaN"):
        raw = b'{"spec": {"model_id": "m", "dataset": "digits", "learning_rate": %s}}' % number
        r = client.post("/api/v1/runs", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == "body.spec.learning_rate"
