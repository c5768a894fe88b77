"""POST /runs reads the model's own files where it can (a local directory, or the Hub over HTTP:
here a local server laid out as the Hub) and refuses a model the trainer cannot fine-tune
before anything is dispatched; the same answer rule as the trainer's preflight."""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.config import Settings
from api.main import create_app
from tests.trainer.families.builders import FAMILIES


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    names = ("gemma4-thinking", "gemma4-e", "llava-next", "paligemma", "qwen2.5-vl", "smolvlm")
    return {name: FAMILIES[name](root / name) for name in names}


def _post(client: TestClient, model_id: str, **spec: Any) -> Any:
    body = {"spec": {"model_id": model_id, "dataset": "digits", **spec}}
    return client.post("/api/v1/runs", json=body)


@pytest.mark.parametrize(
    "name", ["gemma4-thinking", "gemma4-e", "llava-next", "paligemma", "qwen2.5-vl", "smolvlm"]
)
def test_every_family_passes_and_its_config_gives_the_estimate(
    client: TestClient, models: dict[str, Path], name: str
) -> None:
    r = _post(client, str(models[name]))
    assert r.status_code == 201, r.text
    est = r.json()["estimate"]
    # A local directory names no size: the estimate comes from its config.json.
    assert est["parameters"] and est["architecture"] not in (None, "inferred")


def _broken(models: dict[str, Path], tmp_path: Path, template: str) -> Path:
    path = tmp_path / "broken"
    shutil.copytree(models["gemma4-e"], path)
    (path / "chat_template.jinja").write_text(template)
    return path


def test_a_template_without_an_answer_turn_is_refused(
    client: TestClient, models: dict[str, Path], tmp_path: Path
) -> None:
    path = _broken(
        models,
        tmp_path,
        "{% for m in messages %}{% if m['role'] == 'user' %}<|turn>user\n"
        "{{ m['content'][1]['text'] }}<turn|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|turn>model\n{% endif %}",
    )
    r = _post(client, str(path))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert str(path) in detail and "Fix:" in detail
    assert r.json()["errors"][0]["field"] == "body.spec.model_id"


def test_a_model_without_a_vision_tower_or_template_is_refused(
    client: TestClient, models: dict[str, Path], tmp_path: Path
) -> None:
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    (text_only / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    r = _post(client, str(text_only))
    assert r.status_code == 422 and "not a vision-language model" in r.json()["detail"]
    untemplated = _broken(models, tmp_path, "")
    (untemplated / "chat_template.jinja").unlink()
    r = _post(client, str(untemplated))
    assert r.status_code == 422 and "no chat template" in r.json()["detail"]


def test_a_max_length_below_the_image_tokens_is_refused(
    client: TestClient,
) -> None:
    r = _post(client, "llava-hf/llava-1.5-7b-hf", max_length=256)
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "body.spec.max_length"


class _Hub(SimpleHTTPRequestHandler):
    """Serves `root/{org}/{name}/resolve/main/{file}`, the Hub's file URLs."""

    def translate_path(self, path: str) -> str:
        return super().translate_path(path.replace("/resolve/main/", "/"))

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hub(models: dict[str, Path], tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "hub"
    shutil.copytree(models["gemma4-thinking"], root / "google" / "gemma-4-tiny-it")
    shutil.copytree(models["gemma4-e"], root / "google" / "gemma-4-broken-it")
    (root / "google" / "gemma-4-broken-it" / "chat_template.jinja").write_text("{{ bos_token }}")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Hub, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=20)


def test_hub_models_are_read_over_http(
    make_settings: Callable[..., Settings], engine: Engine, hub: str
) -> None:
    with TestClient(create_app(make_settings(hub_url=hub))) as client:
        ok = _post(client, "google/gemma-4-tiny-it")
        assert ok.status_code == 201, ok.text
        assert ok.json()["estimate"]["architecture"] == "gemma4"
        bad = _post(client, "google/gemma-4-broken-it")
        assert bad.status_code == 422 and "google/gemma-4-broken-it" in bad.json()["detail"]
        # Not on this "Hub" (or gated): not refused, the trainer's preflight checks it.
        assert _post(client, "google/not-there").status_code == 201
