"""The tiny checkpoint loads like a real one, and LoRA lands where the spec says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from trainer import model as model_setup
from trainer.contract.spec import RunSpec
from trainer.tiny import BOI, END_OF_TURN, IMAGE_SOFT, build_tiny_model, main


def test_tiny_checkpoint_loads_through_the_auto_classes(tiny_model: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    tok = processor.tokenizer
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    # The model's image token is the soft token; the processor's is the begin-of-image marker.
    assert model.config.image_token_index == tok.convert_tokens_to_ids(IMAGE_SOFT)
    assert processor.image_token_id == tok.convert_tokens_to_ids(BOI)
    assert tok.convert_tokens_to_ids(END_OF_TURN) in model.generation_config.eos_token_id
    text = "What is in this image? Answer with only the label.\n\nseven<end_of_turn>\n"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    # The projector starts from small random values, not Gemma's zeros (notes, trap 1).
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0


def test_build_is_idempotent_and_rebuilds_for_other_labels(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "m")
    weights = path / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert build_tiny_model(tmp_path / "m") == path
    assert weights.stat().st_mtime_ns == first
    assert main([str(path), "--labels", "cat,dog"]) == 0
    assert weights.stat().st_mtime_ns != first
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    assert "cat" in vocab and "seven" not in vocab


def test_an_interrupted_build_is_not_taken_for_a_complete_one(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")  # a half-written checkpoint: no marker
    build_tiny_model(path)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(path).model_type == "gemma3"


@pytest.fixture(scope="module")
def cpu() -> torch.device:
    return model_setup.pick_device("cpu")


def _lora_modules(loaded: model_setup.Loaded) -> list[str]:
    return [n for n, m in loaded.model.named_modules() if hasattr(m, "lora_A") and m.lora_A]


def test_lora_targets_the_language_model_only(tiny_model: Path, cpu: torch.device) -> None:
    loaded = model_setup.load(RunSpec(model_id=str(tiny_model), dataset="digits"), cpu)
    names = _lora_modules(loaded)
    assert len(names) == 2 * 7  # 2 decoder layers x 7 projections
    assert all(".language_model.layers." in n for n in names)
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert not [n for n in trainable if "vision_tower" in n]
    # The projector is trained in full, and saved with the adapter.
    assert any("multi_modal_projector" in n and "modules_to_save" in n for n in trainable)
    assert 0 < loaded.trainable_params < loaded.total_params
    assert not loaded.quantized


def test_lora_vision_adds_the_vision_tower(tiny_model: Path, cpu: torch.device) -> None:
    spec = RunSpec(model_id=str(tiny_model), dataset="digits", lora_vision=True)
    names = _lora_modules(model_setup.load(spec, cpu))
    vision = [n for n in names if ".vision_tower." in n]
    # SigLIP: q, k, v, out_proj, fc1, fc2 in each of 2 layers.
    assert {re.sub(r".*\.", "", n) for n in vision} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
    }
    assert len(vision) == 12


def test_unknown_target_modules_say_what_exists(tiny_model: Path, cpu: torch.device) -> None:
    spec = RunSpec(model_id=str(tiny_model), dataset="digits", lora_target_modules=["qkv"])
    with pytest.raises(model_setup.TargetError, match=r"named qkv .*names are: .*gate_proj"):
        model_setup.load(spec, cpu)


def test_stop_ids_include_the_end_of_turn_marker(tiny_model: Path, cpu: torch.device) -> None:
    loaded = model_setup.load(RunSpec(model_id=str(tiny_model), dataset="digits"), cpu)
    tok = loaded.processor.tokenizer
    ids = model_setup.end_of_turn_ids(loaded.model, loaded.processor, END_OF_TURN)
    assert tok.convert_tokens_to_ids(END_OF_TURN) in ids and tok.eos_token_id in ids


def test_cuda_is_refused_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        model_setup.pick_device("cuda")
