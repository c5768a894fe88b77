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

Liger patches transformers' Gemma 3 module for the whole process (its norm and MLP classes,
its rotary embedding function) as well as the model's own modules, so a model built after a
fused one would be fused too, whatever it asked for. `restore` puts the module back as it was;
trainer.model.load calls it before it builds a model, so every load starts from transformers'
own classes (the bench loads plain and fused models in one process).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

FUSED = "liger"
PLAIN = "plain"
# Each module Liger patched, and its namespace before it did.
_PRISTINE: dict[ModuleType, dict[str, Any]] = {}


def fuse(base: Any, device: torch.device, setting: str) -> str:
    """Fuse `base`'s kernels in place where that is known good; which kernels run (FUSED or
    PLAIN), for the log and results.json."""
    if setting == PLAIN or device.type != "cuda":
        return PLAIN
    if type(base).__name__ != "Gemma3ForConditionalGeneration":
        return PLAIN
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:  # an install without the trainer extra's liger-kernel
        return PLAIN
    patch_gemma3(base)
    return FUSED


def patch_gemma3(base: Any) -> None:
    """Liger's Gemma 3 kernels into `base` (and, as Liger does, into transformers' module for
    the process: `restore` undoes that part). No kernel runs here, so this works on any device."""
    from liger_kernel.transformers import apply_liger_kernel_to_gemma3
    from transformers.models.gemma3 import modeling_gemma3
    from transformers.models.siglip import modeling_siglip

    for module in (modeling_gemma3, modeling_siglip):
        _PRISTINE.setdefault(module, dict(vars(module)))
    apply_liger_kernel_to_gemma3(
        rope=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        layer_norm=True,
        rms_norm=True,
        geglu=True,
        model=base,
    )


def restore() -> None:
    """transformers' modules as they were before `patch_gemma3`; a model already fused stays
    fused (its modules' own forwards), except for the rotary embedding, which its attention
    looks up in the module at each call."""
    for module, names in _PRISTINE.items():
        for added in set(vars(module)) - set(names):
            delattr(module, added)
        for name, value in names.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
    _PRISTINE.clear()
