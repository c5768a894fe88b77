"""A run names this machine's files (local data sets, model directories) only under
TUNEPLANE_LOCAL_DATA_ROOTS, checked after symlinks and `..` are resolved, and a refusal says
the same whether the path exists or not (api/runs/local_paths.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.config import Settings
from api.dispatch.local import LocalDispatcher
from api.dispatch.worker import Worker
from api.main import create_app
from api.runs.states import RunStatus
from tests.api.factories import load_run

MODEL = "google/gemma-3-4b-it"


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    for base in (allowed, outside):
        for label in ("cat", "dog"):
            (base / "images" / label).mkdir(parents=True)
            (base / "images" / label / "1.png").write_bytes(b"not really a png")
        (base / "model").mkdir()
    (allowed / "escape").symlink_to(outside / "images")
    (allowed / "escape-model").symlink_to(outside / "model")
    (allowed / "inside-link").symlink_to(allowed / "images")
    return {"allowed": allowed, "outside": outside}


def _client(make_settings: Callable[..., Settings], **overrides: Any) -> TestClient:
    return TestClient(create_app(make_settings(**overrides)))


@pytest.fixture
def client(
    make_settings: Callable[..., Settings], engine: Engine, roots: dict[str, Path]
) -> Iterator[TestClient]:
    with _client(make_settings, local_data_roots=[roots["allowed"]]) as c:
        yield c


def _create(client: TestClient, **spec: str) -> Any:
    # The larger GPU: what fits is not the question here.
    spec = {"model_id": MODEL, "dataset": "digits", "gpu_type": "nvidia-rtx-pro-6000", **spec}
    body = {"spec": {"train_size": 8, **spec}}
    return client.post("/api/v1/runs", json=body)


def _refusal(client: TestClient, field: str, path: str, **spec: str) -> str:
    r = _create(client, **spec)
    assert r.status_code == 422, r.text
    [error] = r.json()["errors"]
    assert error["field"] == f"body.spec.{field}"
    assert r.json()["title"] == "Path outside the data roots"
    # What is left once the path as given is taken out: the same words for every refusal.
    return str(error["message"]).replace(repr(path), "PATH")


def test_paths_under_the_roots_are_accepted(client: TestClient, roots: dict[str, Path]) -> None:
    allowed = roots["allowed"]
    for dataset in (
        f"imagefolder:{allowed / 'images'}",
        f"imagefolder:{allowed / 'not-made-yet'}",  # the trainer says whether it is there
        f"imagefolder:{allowed / 'inside-link'}",  # a symlink that stays inside
        f"oxford-iiit-pet:{allowed / 'images' / '..' / 'images'}",
    ):
        assert _create(client, dataset=dataset).status_code == 201, dataset
    assert _create(client, model_id=str(allowed / "model")).status_code == 201
    # Hub ids and the Hub's data set name no file of this machine.
    assert _create(client, model_id="Qwen/Qwen2.5-VL-3B-Instruct").status_code == 201
    assert _create(client, dataset="oxford-iiit-pet").status_code == 201


def test_outside_the_roots_is_refused_without_telling_whether_it_exists(
    client: TestClient, roots: dict[str, Path], tmp_path: Path
) -> None:
    allowed, outside = roots["allowed"], roots["outside"]
    existing, missing = str(outside / "images"), str(tmp_path / "nowhere" / "images")
    words = {
        _refusal(client, "dataset", existing, dataset=f"imagefolder:{existing}"),
        _refusal(client, "dataset", missing, dataset=f"imagefolder:{missing}"),
        _refusal(client, "dataset", "/etc", dataset="oxford-iiit-pet:/etc"),
        _refusal(client, "model_id", str(outside / "model"), model_id=str(outside / "model")),
        _refusal(client, "model_id", "/no/such/model", model_id="/no/such/model"),
    }
    assert len(words) == 1, words
    [message] = words
    assert message.startswith("PATH is not a directory this server lets runs read")
    assert str(allowed) in message  # the roots are named: the fix is a setting
    assert "exist" not in message


def test_dot_dot_symlink_and_relative_escapes_are_refused(
    client: TestClient, roots: dict[str, Path]
) -> None:
    allowed = roots["allowed"]
    escapes = {
        "dataset": [
            str(allowed / ".." / "outside" / "images"),
            str(allowed / "escape"),  # a symlink inside the root to a folder outside
            str(allowed / "escape" / ".." / "model"),
            "./images",
            "~/images",
        ],
        "model_id": [str(allowed / "escape-model"), str(allowed / ".." / "outside" / "model")],
    }
    words = set()
    for path in escapes["dataset"]:
        words.add(_refusal(client, "dataset", path, dataset=f"imagefolder:{path}"))
    for path in escapes["model_id"]:
        words.add(_refusal(client, "model_id", path, model_id=path))
    assert len(words) == 1, words
    # The resolved target is never shown.
    assert str(roots["outside"]) not in next(iter(words))


def test_retrain_and_template_runs_are_checked_too(
    client: TestClient, roots: dict[str, Path]
) -> None:
    run = _create(client, dataset=f"imagefolder:{roots['allowed'] / 'images'}").json()
    outside = f"imagefolder:{roots['outside'] / 'images'}"
    r = client.post(f"/api/v1/runs/{run['id']}/retrain", json={"overrides": {"dataset": outside}})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.overrides.dataset"
    spec = {"model_id": MODEL, "dataset": outside, "gpu_type": "nvidia-rtx-pro-6000"}
    assert client.post("/api/v1/templates", json={"name": "t", "spec": spec}).status_code == 201
    r = client.post("/api/v1/templates/t/runs", json={})
    assert r.status_code == 422, r.text
    assert r.json()["title"] == "Path outside the data roots"


def test_the_default_root_is_the_data_directory(
    make_settings: Callable[..., Settings], engine: Engine, roots: dict[str, Path]
) -> None:
    settings = make_settings(local_data_roots=[])
    (settings.data_dir / "sets" / "a").mkdir(parents=True)
    with TestClient(create_app(settings)) as client:
        inside = f"imagefolder:{settings.data_dir / 'sets'}"
        assert _create(client, dataset=inside).status_code == 201
        r = _create(client, dataset=f"imagefolder:{roots['allowed'] / 'images'}")
        assert r.status_code == 422, r.text
        assert str(settings.data_dir.resolve()) in r.json()["detail"]


def test_cloud_run_paths_name_the_trainers_files_and_are_not_refused(
    make_settings: Callable[..., Settings], engine: Engine, roots: dict[str, Path]
) -> None:
    """With Cloud Run a path names the trainer's container (a mounted bucket), not this
    machine; the api still reads no model directory of its own outside the roots."""
    settings = make_settings(
        local_data_roots=[roots["allowed"]],
        dispatcher="cloudrun",
        callback_signing_key="k" * 32,
        public_url="https://api.example",
    )
    # A directory outside the roots whose config.json would be refused if it were read.
    (roots["outside"] / "model" / "config.json").write_text('{"model_type": "bert"}')
    with TestClient(create_app(settings)) as client:
        r = _create(client, dataset="imagefolder:/mnt/bucket/images")
        assert r.status_code == 201, r.text
        r = _create(client, model_id=str(roots["outside"] / "model"))
        assert r.status_code == 201, r.text  # not read, so not refused: the trainer checks it
        (roots["allowed"] / "model" / "config.json").write_text('{"model_type": "bert"}')
        r = _create(client, model_id=str(roots["allowed"] / "model"))
        assert r.status_code == 422 and "vision_config" in r.json()["detail"], r.text


def test_a_run_queued_under_wider_roots_fails_at_start_instead_of_reading_outside(
    make_settings: Callable[..., Settings], engine: Engine, roots: dict[str, Path]
) -> None:
    """The operator narrows the roots and restarts the server while runs made under the wider
    ones wait in the queue: the local dispatcher checks again before it starts a trainer, so
    such a run fails, with the words a creation would have been refused with (the same whether
    the path exists or not), and no trainer reads the path."""
    outside = {"exists": roots["outside"] / "images", "missing": roots["outside"] / "gone"}
    inside = roots["allowed"] / "images"
    with _client(make_settings, local_data_roots=[roots["allowed"], roots["outside"]]) as c:
        made = {k: _create(c, dataset=f"imagefolder:{p}") for k, p in outside.items()}
        made["inside"] = _create(c, dataset=f"imagefolder:{inside}")
    ids = {k: r.json()["id"] for k, r in made.items() if r.status_code == 201}
    assert len(ids) == 3, [r.text for r in made.values()]

    narrowed = make_settings(local_data_roots=[roots["allowed"]], max_concurrency=4)
    with _client(make_settings, local_data_roots=[roots["allowed"]]) as c:
        words = {k: _refusal(c, "dataset", str(p), dataset=f"imagefolder:{p}")
                 for k, p in outside.items()}  # fmt: skip
    # A trainer that only exits: the inside run starts, the others must not.
    dispatcher = LocalDispatcher(narrowed, trainer_command=[sys.executable, "-c", "pass"])
    worker = Worker(narrowed, engine, dispatcher)
    try:
        assert worker.dispatch_ready() == 1
    finally:
        worker.stop()
        dispatcher.close()
    reasons = {}
    for key, path in outside.items():
        run = load_run(engine, ids[key])
        assert run.status == RunStatus.failed and run.execution_name is None, run.status_reason
        prefix = "dispatch failed: spec.dataset: "
        assert (run.status_reason or "").startswith(prefix), run.status_reason
        reason = (run.status_reason or "").removeprefix(prefix)
        reasons[key] = reason.replace(repr(str(path)), "PATH")
        assert not (narrowed.logs_dir / f"{ids[key]}-0.log").exists()  # nothing started
    assert reasons == words and reasons["exists"] == reasons["missing"]
    assert load_run(engine, ids["inside"]).status != RunStatus.failed
