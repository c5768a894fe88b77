"""Tiny LLaVA-1.5 and LLaVA-NeXT checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.trainer.families import templates as tpl
from tests.trainer.families.common import VISION, llama_text, save
from tests.trainer.families.tokenizers import build as build_tokenizer

# ---- LLaVA-1.5 / LLaVA-NeXT ---------------------------------------------------------------


def _llava_tokenizer(template: str, words: str) -> Any:
    return build_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>", "<pad>"],
        words,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        extra={"image_token": "<image>"},
        chat_template=template,
    )


def _llava_config(cls: Any, tok: Any, **extra: Any) -> Any:
    return cls(
        text_config=llama_text(tok),
        vision_config=dict(
            VISION, model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        image_seq_length=16,  # (32 / 8)^2 patches: the processor's count for the base image
        vision_feature_select_strategy="default",
        **extra,
    )


def _llava_processor(cls: Any, images: Any, tok: Any, template: str) -> Any:
    return cls(
        image_processor=images,
        tokenizer=tok,
        patch_size=8,
        # The CLS token the vision tower adds, as in llava-hf's processor_config.json.
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=template,
    )


def llava(path: Path) -> Path:
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _llava_tokenizer(tpl.LLAVA, tpl.LLAVA_WORDS)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = _llava_processor(LlavaProcessor, images, tok, tpl.LLAVA)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(_llava_config(LlavaConfig, tok))
    return save(path, model, processor, tok, ["</s>"])


def llava_next(path: Path) -> Path:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = _llava_tokenizer(tpl.LLAVA_NEXT, tpl.LLAVA_NEXT_WORDS)
    grid = [[32, 32]]
    images = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=grid
    )
    processor = _llava_processor(LlavaNextProcessor, images, tok, tpl.LLAVA_NEXT)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(
        _llava_config(LlavaNextConfig, tok, image_grid_pinpoints=grid)
    )
    return save(path, model, processor, tok, ["</s>"])
