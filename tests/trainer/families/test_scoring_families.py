"""Label scoring in every family against a brute-force forward of prompt + label per label
(tests/trainer/test_scoring.py's reference): the family's own prompt mask (Gemma 3's
bidirectional image blocks, PaliGemma's prefix-LM), Qwen2-VL's M-RoPE positions and the
sliding-window layers all reach the label-tree forward. fp32 on the CPU: within 2e-5, and the
same predicted labels."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.trainer.test_scoring import check_against_brute_force
from trainer import data


def test_scores_equal_a_full_forward_per_label(family: tuple[str, Path]) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name, path = family
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    splits = data.load_splits("digits", 1, 3, seed=0)
    scores = check_against_brute_force(
        model, processor, splits.labels, splits.eval, max_length=1024
    )
    assert (scores[0] - scores[1]).abs().max() > 1e-4, name  # the image reaches the scores
