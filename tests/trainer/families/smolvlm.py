"""Tiny SmolVLM (Idefics3) and SmolVLM2 checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.trainer.families import templates as tpl
from tests.trainer.families.common import VISION, llama_text, save
from tests.trainer.families.tokenizers import build as build_tokenizer

# ---- SmolVLM (Idefics3) / SmolVLM2 --------------------------------------------------------

SMOL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>",
    "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
]  # fmt: skip


def _smol_tokenizer() -> Any:
    return build_tokenizer(
        SMOL_SPECIALS,
        tpl.SMOLVLM_WORDS,
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        extra={
            "fake_image_token": "<fake_token_around_image>",
            "image_token": "<image>",
            "end_of_utterance_token": "<end_of_utterance>",
            "global_image_token": "<global-img>",
        },
        chat_template=tpl.SMOLVLM,
    )


def _smol_config(cls: Any, tok: Any) -> Any:
    return cls(
        text_config=llama_text(tok),
        vision_config=dict(VISION, image_size=32, patch_size=8),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )


def smolvlm(path: Path) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tok = _smol_tokenizer()
    images = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": 32},
        max_image_size={"longest_edge": 32},
    )
    # (32/8)^2 patches / scale_factor^2 = 4 image tokens.
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=tpl.SMOLVLM
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(_smol_config(Idefics3Config, tok))
    return save(path, model, processor, tok, ["<end_of_utterance>"])


def smolvlm2(path: Path) -> Path:
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
    )
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    tok = _smol_tokenizer()
    size = dict(size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=False, **size),
        tokenizer=tok,
        video_processor=SmolVLMVideoProcessor(**size),
        image_seq_len=4,
        chat_template=tpl.SMOLVLM,
    )
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(_smol_config(SmolVLMConfig, tok))
    return save(path, model, processor, tok, ["<end_of_utterance>"])
