"""The QLoRA path (bitsandbytes 4-bit) on a real NVIDIA GPU. Never in CI; the 4B-architecture
figures come from bench/gpu_trainer.py (see bench/README.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from trainer import model as model_setup
from trainer.cli import main
from trainer.contract.spec import RunSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_the_model_loads_in_4_bit_with_lora_on_top(tiny_model: Path) -> None:
    import bitsandbytes as bnb

    spec = RunSpec(model_id=str(tiny_model), dataset="digits")
    loaded = model_setup.load(spec, model_setup.pick_device("cuda"))
    assert loaded.quantized
    four_bit = [n for n, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(".language_model.layers." in n for n in four_bit)
    weight = next(m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
    quant_state = getattr(weight, "quant_state")  # noqa: B009 - bnb's Params4bit attribute
    assert quant_state.quant_type == "nf4"
    assert quant_state.nested  # double quantization
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    assert trainable and all(p.device.type == "cuda" for p in trainable)


def test_the_cli_trains_and_evaluates_on_cuda(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("TUNEPLANE_")]:
        monkeypatch.delenv(key)
    code = main(
        [
            "--model-id",
            str(tiny_model),
            "--dataset",
            "digits",
            "--train-size",
            "256",
            "--eval-size",
            "50",
            "--num-epochs",
            "2",
            "--learning-rate",
            "5e-3",
            "--batch-size",
            "16",
            "--gradient-accumulation-steps",
            "1",
            "--device",
            "cuda",
            "--output-dir",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert code == 0, results.get("error")
    assert results["model"]["quantized_4bit"]
    assert results["environment"]["gpu_name"]
    assert results["peak_gpu_memory_gb"] > 0
    assert results["training"]["step"] == 32
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
