"""Fused GPU kernels (Liger) for the families where they are measured correct and faster.

A Gemma 3 step spends much of its time outside the matrix multiplications: six RMSNorms a
layer (input, post-attention, pre- and post-feed-forward, and the query/key norms), the GeGLU
gate, the rotary embedding and the vision tower's LayerNorms, each a separate read and write
of the activations in the eager model. Liger's Triton kernels fuse each into one pass. Measured
on an H200 with the Gemma 3 4B architecture at the auto plan's 16 x 1 (bench/gpu_experiments.py,
bench/results/gpu_trainer_v4/): a whole training step 1.26x faster in bf16 and 1.13x under NF4,
the same batch's loss the same to 0.05%; the loss and the LoRA gradients of the plain and the
fused model are compared in tests/trainer/test_gpu_kernels.py (GPU only: Triton kernels do not
run on the CPU, and its interpreter does not run Liger's).

What is fused, and what is not: Liger's fused linear cross-entropy is left out on purpose: it
replaces the model's forward, and the answer-only loss (trainer.loss) already computes the head
at a handful of positions, so it would save nothing and lose `logits_to_keep`. Only Gemma 3 is
fused: it is what was measured. `kernels: plain` in the spec turns it off.

Liger patches transformers' Gemma 3 and SigLIP classes for the whole process as well as the
model's own modules; a trainer process loads one model, so that is what we want.
"""

from __future__ import annotations

from typing import Any

import torch

FUSED = "liger"
PLAIN = "plain"


def fuse(base: Any, device: torch.device, setting: str) -> str:
    """Fuse `base`'s kernels in place where that is known good; which kernels run (FUSED or
    PLAIN), for the log and results.json."""
    if setting == PLAIN or device.type != "cuda":
        return PLAIN
    if type(base).__name__ != "Gemma3ForConditionalGeneration":
        return PLAIN
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_gemma3
    except ImportError:  # an install without the trainer extra's liger-kernel
        return PLAIN
    apply_liger_kernel_to_gemma3(
        rope=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        layer_norm=True,
        rms_norm=True,
        geglu=True,
        model=base,
    )
    return FUSED
