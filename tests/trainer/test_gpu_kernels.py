"""The fused kernels (trainer/kernels.py) give the plain model's loss and LoRA gradients, on a
real NVIDIA GPU with the tiny Gemma 3. Never in CI (Triton kernels need the GPU); the same check
on the Gemma 3 4B architecture is bench/gpu_experiments.py --equivalence, whose output is kept
in bench/results/gpu_trainer_v4/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.gpu_experiments import kernel_equivalence
from bench.gpu_trainer import build_images

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("quantization", ["auto", "nf4"])
def test_fused_kernels_match_the_plain_loss_and_gradients(
    tiny_model: Path, tmp_path: Path, quantization: str
) -> None:
    images = build_images(tmp_path / "images", 4, 2)
    check = kernel_equivalence(tiny_model, images, quantization)
    assert check["kernels"] == "liger"
    # bf16 matmuls either way; the fused norms round once where the eager ones round per op.
    # The 4B's figures (bench/results/gpu_trainer_v4/) are well inside these bounds.
    assert check["loss_relative_error"] < 1e-2
    assert check["gradient_relative_error_all"] < 5e-2
