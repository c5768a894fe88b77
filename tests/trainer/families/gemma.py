"""Tiny Gemma 3 and Gemma 4 (both chat-template variants) checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.trainer.families import templates as tpl
from tests.trainer.families.common import TEXT, VISION, randomize_zeros, save, token_ids
from tests.trainer.families.tokenizers import build as build_tokenizer
from trainer import tiny

# ---- Gemma 3 ------------------------------------------------------------------------------


def gemma3(path: Path) -> Path:
    return tiny.build_tiny_model(path)


# ---- Gemma 4 ------------------------------------------------------------------------------

GEMMA4_SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
    "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>",
    "<|tool_response>",
]  # fmt: skip


GEMMA4_EXTRA = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}


def gemma4_ids(tok: Any) -> dict[str, int]:
    """Gemma4Config's special-token ids, tied to `tok`."""
    names = ("<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio>", "<audio|>", "<|audio|>")
    boi, eoi, image, video, boa, eoa, audio = token_ids(tok, *names)
    return dict(
        boi_token_id=boi,
        eoi_token_id=eoi,
        image_token_id=image,
        video_token_id=video,
        boa_token_id=boa,
        eoa_token_index=eoa,
        audio_token_id=audio,
    )


def _gemma4(path: Path, template: str) -> Path:
    from transformers import (
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4Processor,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    tok = build_tokenizer(
        GEMMA4_SPECIALS,
        tpl.GEMMA4_WORDS,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        extra=GEMMA4_EXTRA,
        chat_template=template,
    )
    # 70 soft tokens is Gemma 4's smallest image budget; 4-pixel patches keep the image small.
    image_kw = dict(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**image_kw),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(**image_kw),
        chat_template=template,
        image_seq_length=70,
    )
    text = Gemma4TextConfig(
        vocab_size=len(tok),
        **TEXT,
        vocab_size_per_layer_input=len(tok),
        hidden_size_per_layer_input=8,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    vision = Gemma4VisionConfig(
        **VISION, num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3
    )
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, **gemma4_ids(tok)
    )
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(config)
    randomize_zeros(model.model.embed_vision)
    return save(path, model, processor, tok, ["<eos>", "<turn|>"])


def gemma4_e(path: Path) -> Path:
    return _gemma4(path, tpl.GEMMA4_E)


def gemma4_thinking(path: Path) -> Path:
    return _gemma4(path, tpl.GEMMA4_THINKING)
