"""Gemma 3 architectures the benches build with random weights (the Hub is out of reach):
(text config, vision config, tokens per image, image size) by name.

4B, 12B and 27B are google/gemma-3-{4b,12b,27b}-it's config.json values (text: hidden size,
layers, MLP width, heads, KV heads, head dim, the query scaling; the vision tower is the same
SigLIP so400m at 896 pixels in all three). "tiny" is the same flow for a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SIGLIP_896 = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    layer_norm_eps=1e-6,
    vision_use_head=False,
)
ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}
# (hidden, layers, intermediate, heads, kv heads, head dim, query_pre_attn_scalar)
TEXT = {
    "4b": (2560, 34, 10_240, 8, 4, 256, 256),
    "12b": (3840, 48, 15_360, 16, 8, 256, 256),
    "27b": (5376, 62, 21_504, 32, 16, 128, 168),
}


def _gemma3(name: str) -> tuple[Any, Any, int, int]:
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    hidden, layers, inter, heads, kv, head_dim, scalar = TEXT[name]
    text = Gemma3TextConfig(
        vocab_size=262_208,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        query_pre_attn_scalar=scalar,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131_072,
        rms_norm_eps=1e-6,
        sliding_window=1024,
        rope_parameters=ROPE,
    )
    return text, SiglipVisionConfig(**SIGLIP_896), 256, 896


def _tiny() -> tuple[Any, Any, int, int]:
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=256,
    )
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
    )
    return text, vision, 16, 32


PARTS: dict[str, Callable[[], tuple[Any, Any, int, int]]] = {
    "tiny": _tiny,
    **{name: (lambda n=name: _gemma3(n)) for name in TEXT},
}


def config(name: str) -> Any:
    """The whole Gemma3Config of architecture `name` (special token ids left at their
    defaults: enough for counting parameters and FLOPs; bench/gpu_trainer.py ties them to its
    tokenizer)."""
    from transformers import Gemma3Config

    text, vision, tokens, _ = PARTS[name]()
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens)
