"""`--merge`: the base model with the adapter added in, saved in bf16 beside the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.cli import main


def test_the_merged_model_is_the_base_plus_the_adapter(tiny_model: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "out"
    argv = ["--model-id", str(tiny_model), "--dataset", "digits", "--train-size", "8"]
    argv += ["--eval-size", "2", "--batch-size", "4", "--gradient-accumulation-steps", "1"]
    argv += ["--learning-rate", "0.01", "--merge", "--output-dir", str(out), "--device", "cpu"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["artifacts"]["merged"] == f"{out}/merged"
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    assert merged.dtype == torch.bfloat16
    assert not [n for n, _ in merged.named_modules() if "lora" in n]
    # Against the adapter applied to the fp32 base: the same weights, up to bf16 rounding.
    base = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32)
    original = base.model.language_model.layers[0].self_attn.q_proj.weight.detach().clone()
    reference = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
    expected = reference.model.language_model.layers[0].self_attn.q_proj.weight
    got = merged.model.language_model.layers[0].self_attn.q_proj.weight.float()
    assert not torch.allclose(expected, original)  # training moved it
    assert torch.allclose(got, expected, atol=1e-2, rtol=1e-2)
    saved = load_file(str(out / "merged" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in saved.values() if t.is_floating_point())
