"""Fail before paying: a run that cannot work stops in the preflight, naming the model and the
fix, before any weight is read or any evaluation runs. The checkpoints here have no weights at
all (model.safetensors removed), so reaching the model load would fail differently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer import preflight
from trainer.cli import main
from trainer.contract.spec import RunSpec


@pytest.fixture
def weightless(tiny_model: Path, tmp_path: Path) -> Path:
    path = tmp_path / "weightless"
    shutil.copytree(tiny_model, path)
    (path / "model.safetensors").unlink()
    return path


def _run(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict]:
    argv = ["--model-id", str(path), "--dataset", "digits", "--train-size", "4"]
    events = tmp_path / "events.jsonl"
    argv += ["--eval-size", "2", "--output-dir", str(tmp_path / "out"), *extra]
    assert main([*argv, "--events-file", str(events)]) == 1
    return [json.loads(line) for line in events.read_text().splitlines() if line.strip()]


def test_a_template_without_an_answer_turn_fails_first(
    weightless: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A template that renders user turns only: there is no place for the answer.
    (weightless / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}<start_of_turn>user\n"
        "{{ m['content'][1]['text'] }}<end_of_turn>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    with pytest.raises(preflight.PreflightError, match="Fix: use the model's instruction-tuned"):
        preflight.check(RunSpec(model_id=str(weightless), dataset="digits"))
    events = _run(weightless, tmp_path, capsys)
    failed = events[-1]
    assert failed["type"] == "failed" and str(weightless) in failed["data"]["error"]
    assert "PreflightError" in failed["data"]["error"]
    phases = [e["data"]["phase"] for e in events if e["type"] == "phase"]
    assert phases == [] and not [e for e in events if e["type"] == "evaluation"]


def test_lora_targets_that_match_nothing_fail_first(
    weightless: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = _run(weightless, tmp_path, capsys, "--lora-target-modules", "q_proj,query")
    error = events[-1]["data"]["error"]
    assert "no linear layer named query" in error and "q_proj" in error and "all-linear" in error
    assert not [e for e in events if e["type"] == "phase"]


def test_a_model_that_is_not_there_fails_first(tmp_path: Path) -> None:
    with pytest.raises(preflight.PreflightError, match=r"config\.json cannot be read"):
        preflight.check(RunSpec(model_id=str(tmp_path / "nothing"), dataset="digits"))


def test_all_linear_covers_every_projection_of_the_language_layers(weightless: Path) -> None:
    spec = RunSpec(model_id=str(weightless), dataset="digits", lora_target_modules=["all-linear"])
    checked = preflight.check(spec)
    assert checked.lora_modules == 2 * 7  # Gemma 3's layers hold exactly the seven
    with pytest.raises(ValueError, match="stands alone"):
        RunSpec(model_id="m", dataset="digits", lora_target_modules=["all-linear", "q_proj"])
