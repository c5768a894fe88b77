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


def _processor(cls: Any, images: Any, videos: Any, tok: Any, template: str, **pixels: Any) -> Any:
    """A Qwen processor whose image and video processors make the same small grids."""
    return cls(
        image_processor=images(**pixels),
        tokenizer=tok,
        video_processor=videos(**pixels),
        chat_template=template,
    )


def _build(
    path: Path, cls: Any, config: Any, tok: Any, text: dict[str, Any], processor: Any, **vision: Any
) -> Path:
    """The model of `config` class with Qwen's token ids and a two-block vision tower (`vision`
    adds what each version's tower needs), saved with `processor`."""
    config = config(
        text_config=dict(
            text, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, **vision
        ),
        **qwen_ids(tok),
    )
    torch.manual_seed(0)
    return save(path, cls(config), processor, tok, ["<|im_end|>", "<|endoftext|>"])


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
    processor = _processor(
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        tok,
        tpl.QWEN2_5_VL,
        min_pixels=56 * 56,
        max_pixels=56 * 56,
    )
    text = dict(TEXT, vocab_size=len(tok), rope_scaling=None)
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3]}
    return _build(
        path,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLConfig,
        tok,
        text,
        processor,
        fullatt_block_indexes=[1],
        window_size=112,
    )


def qwen3_vl(path: Path) -> Path:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tok = _qwen_tokenizer(tpl.QWEN3_VL)
    processor = _processor(
        Qwen3VLProcessor,
        Qwen2VLImageProcessor,
        Qwen3VLVideoProcessor,
        tok,
        tpl.QWEN3_VL,
        size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64},
        patch_size=16,
        merge_size=2,
    )
    text = dict(TEXT, vocab_size=len(tok))
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
    }
    return _build(
        path,
        Qwen3VLForConditionalGeneration,
        Qwen3VLConfig,
        tok,
        text,
        processor,
        patch_size=16,
        num_position_embeddings=16,
        deepstack_visual_indexes=[1],
    )
