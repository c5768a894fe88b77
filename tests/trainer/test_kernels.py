"""When the trainer fuses kernels (trainer/kernels.py), and when it must not. That the fused
kernels compute the plain model's loss and gradients needs a GPU:
tests/trainer/test_gpu_kernels.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.gemma3 import modeling_gemma3

from trainer import kernels
from trainer import model as model_setup
from trainer.contract.spec import RunSpec


def _forwards(model: torch.nn.Module) -> dict[str, Any]:
    # Liger binds a module's new forward on the instance, and swaps the module's classes.
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def test_the_cpu_never_fuses(tiny_model: Path) -> None:
    base = model_setup.load_base(str(tiny_model), torch.device("cpu"))
    assert type(base).__name__ == "Gemma3ForConditionalGeneration"
    forwards, module = _forwards(base), dict(vars(modeling_gemma3))
    assert kernels.fuse(base, torch.device("cpu"), "auto") == kernels.PLAIN
    assert _forwards(base) == forwards
    assert dict(vars(modeling_gemma3)) == module


def test_plain_kernels_are_never_fused_on_cuda() -> None:
    # Named like the family that is fused: only the setting keeps it plain (Liger itself would
    # refuse this stub with a TypeError). Decided before CUDA is touched: runs without a GPU.
    Gemma3ForConditionalGeneration = type("Gemma3ForConditionalGeneration", (torch.nn.Module,), {})
    stub = Gemma3ForConditionalGeneration()
    assert kernels.fuse(stub, torch.device("cuda"), "plain") == kernels.PLAIN
    assert kernels.fuse(torch.nn.Linear(2, 2), torch.device("cuda"), "auto") == kernels.PLAIN


def test_a_load_after_a_fused_one_builds_from_transformers_own_classes(tiny_model: Path) -> None:
    """Liger patches transformers' Gemma 3 module for the process; the next load undoes it, so a
    plain model after a fused one is plain (the bench loads both in one process)."""
    original_norm = modeling_gemma3.Gemma3RMSNorm
    original_rope = modeling_gemma3.apply_rotary_pos_emb
    fused = model_setup.load_base(str(tiny_model), torch.device("cpu"))
    try:
        kernels.patch_gemma3(fused)  # swaps modules only: no kernel runs, so the CPU will do
        assert modeling_gemma3.Gemma3RMSNorm is not original_norm
        assert modeling_gemma3.apply_rotary_pos_emb is not original_rope
        spec = RunSpec(model_id=str(tiny_model), dataset="digits", kernels="plain")
        plain = model_setup.load(spec, torch.device("cpu"))
    finally:
        kernels.restore()
    assert modeling_gemma3.Gemma3RMSNorm is original_norm
    assert modeling_gemma3.apply_rotary_pos_emb is original_rope
    assert plain.kernels == kernels.PLAIN
    norms = [m for m in plain.model.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(type(m) is original_norm for m in norms)
    assert all("forward" not in m.__dict__ for m in norms)


def test_the_spec_takes_kernels_and_refuses_an_unknown_value() -> None:
    assert RunSpec(model_id="m", dataset="digits").kernels == "auto"
    flags = ["--model-id", "m", "--dataset", "digits", "--kernels", "plain"]
    assert RunSpec.from_flags(flags).kernels == "plain"
    with pytest.raises(ValueError, match="kernels"):
        RunSpec(model_id="m", dataset="digits", kernels="triton")  # type: ignore[arg-type]


def test_a_loaded_model_says_which_kernels_run(tiny_model: Path) -> None:
    spec = RunSpec(model_id=str(tiny_model), dataset="digits")
    assert model_setup.load(spec, torch.device("cpu")).kernels == kernels.PLAIN
