"""The training loss with logits only where the loss reads them.

The loss counts the answer tokens only (trainer.collator), a handful per example, yet a plain
forward projects every position onto the vocabulary: positions x 262k floats for Gemma 3, the
largest tensor of the step and a large share of its FLOPs. Here the language-model head runs only
on the hidden states whose next token is an answer token (transformers' `logits_to_keep` with a
boolean (batch, sequence) mask), and the cross-entropy is the same mean over those tokens as the
model's own loss (tests/trainer/test_loss.py: equal loss and LoRA gradients).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from trainer.collator import IGNORE_INDEX


def supports_answer_logits(model: Any) -> bool:
    """Whether the (unwrapped) model's forward takes `logits_to_keep` (most causal LMs and VLMs
    in transformers do); the others keep the plain path."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_loss(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens, with the head computed at those positions
    only. `inputs` holds `labels` as the collator made them (not shifted)."""
    labels = inputs["labels"]
    # Position p predicts token p + 1: keep p where labels[p + 1] counts.
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**rest, logits_to_keep=keep).logits  # (answer tokens, vocabulary)
    if logits.dim() == 3 and logits.shape[:2] == keep.shape:
        # A model whose forward takes the argument but not a mask (PaliGemma under peft, seen
        # in tests/trainer/families) returns every position: the same loss, without the saving.
        logits = logits[keep]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def training_loss(model: Any, inputs: dict[str, Any], answer_only: bool) -> torch.Tensor:
    if answer_only:
        return answer_loss(model, inputs)
    return model(**inputs).loss
