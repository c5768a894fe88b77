"""Tiny PaliGemma and PaliGemma 2 checkpoints (prefix-LM, no chat template)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.trainer.families.common import TEXT, VISION, save
from tests.trainer.families.tokenizers import build as build_tokenizer

# ---- PaliGemma / PaliGemma 2 --------------------------------------------------------------


def _paligemma(path: Path, text_model: str) -> Path:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    # No chat template: PaliGemma is prompted with a prefix and trained on a suffix.
    tok = build_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        "answer en",
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        extra={"image_token": "<image>"},
    )
    processor = PaliGemmaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16),
        tokenizer=tok,
    )
    config = PaliGemmaConfig(
        text_config=dict(
            TEXT,
            model_type=text_model,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        ),
        vision_config=dict(VISION, image_size=32, patch_size=8, projection_dim=64),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=64,
        hidden_size=64,
    )
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config)
    return save(path, model, processor, tok, ["<eos>"])


def paligemma(path: Path) -> Path:
    return _paligemma(path, "gemma")


def paligemma2(path: Path) -> Path:
    return _paligemma(path, "gemma2")
