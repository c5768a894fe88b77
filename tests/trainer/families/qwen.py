"""Tiny Qwen2.5-VL and Qwen3-VL checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.trainer.families import templates as tpl
from tests.trainer.families.common import TEXT, save, token_ids
from tests.trainer.families.tokenizers import build as build_tokenizer

# ---- Qwen2.5-VL / Qwen3-VL ----------------------------------------------------------------

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip


def _qwen_tokenizer(template: str) -> Any:
    # Qwen's tokenizers have no BOS and no UNK; pad is <|endoftext|>, eos <|im_end|>.
    return build_tokenizer(
        QWEN_SPECIALS,
        tpl.QWEN_WORDS,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=template,
    )


def qwen_ids(tok: Any) -> dict[str, int]:
    image, video, start, end = token_ids(
        tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    return dict(
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )


def qwen2_5_vl(path: Path) -> Path:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = _qwen_tokenizer(tpl.QWEN2_5_VL)
    # 28x28 images (min_pixels): 2x2 patches of 14 pixels merged 2x2 -> one image token... too
    # few to learn from; 56x56 gives 4x4 patches -> 4 tokens.
    pixels = dict(min_pixels=56 * 56, max_pixels=56 * 56)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=tpl.QWEN2_5_VL,
    )
    text = dict(TEXT, vocab_size=len(tok), rope_scaling=None)
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3]}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            text, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
            window_size=112,
        ),
        **qwen_ids(tok),
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return save(path, model, processor, tok, ["<|im_end|>", "<|endoftext|>"])


def qwen3_vl(path: Path) -> Path:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tok = _qwen_tokenizer(tpl.QWEN3_VL)
    pixels = dict(patch_size=16, merge_size=2)
    size = {"shortest_edge": 64 * 64, "longest_edge": 64 * 64}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **pixels),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(size=size, **pixels),
        chat_template=tpl.QWEN3_VL,
    )
    text = dict(TEXT, vocab_size=len(tok))
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
    }
    config = Qwen3VLConfig(
        text_config=dict(
            text, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            num_position_embeddings=16,
            deepstack_visual_indexes=[1],
        ),
        **qwen_ids(tok),
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    return save(path, model, processor, tok, ["<|im_end|>", "<|endoftext|>"])
