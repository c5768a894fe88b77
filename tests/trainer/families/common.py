"""Shared pieces of the tiny family builders: small widths, the generation config, saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Small text and vision widths shared by every family.
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def llama_text(tok: Any) -> dict[str, Any]:
    """The small Llama text model of the families built on one (LLaVA, SmolVLM), sized to `tok`."""
    return dict(
        TEXT,
        model_type="llama",
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )


def token_ids(tok: Any, *names: str) -> list[int]:
    return [tok.convert_tokens_to_ids(n) for n in names]


def generation_config(tok: Any, eos: list[str]) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=token_ids(tok, *eos),
        do_sample=False,
    )


def save(path: Path, model: Any, processor: Any, tok: Any, eos: list[str]) -> Path:
    model.generation_config = generation_config(tok, eos)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def randomize_zeros(module: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised projectors (Gemma's) cannot see the image: give them small weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
