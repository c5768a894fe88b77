"""What the estimator knows about a model's architecture: the families the trainer supports, from
their public configs; any model from its config.json; else a guess from a size in its id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Arch:
    """What the memory and time model needs to know about a model."""

    name: str
    exact: bool  # a known config, or inferred from the parameter count
    hidden: int
    intermediate: int
    layers: int
    q_dim: int  # attention heads x head dim
    kv_dim: int
    vocab: int
    # Vision tower with its projector, and any audio tower: never 4-bit (trainer.model.NF4_SKIP
    # and the projector's `keep`).
    vision_params: int
    image_tokens: int = 0  # tokens one image takes in the prompt (typical, for dynamic ones)
    untied_head: bool = False  # an output projection of its own (not the embeddings')
    extra_embed_params: int = 0  # Gemma 4 E-series per-layer embeddings
    softcap: bool = False  # a final logit soft-cap (Gemma 2 and 4 text models)
    # The projector, trained in full: peft's modules_to_save trains a copy beside the frozen
    # original (which vision_params counts).
    projector_params: int = 0
    # Mixture-of-experts layers (Gemma 4 26B-A4B): the experts' weights per layer, held as 3-D
    # parameters that bitsandbytes does not quantize (it replaces nn.Linear only), and the
    # intermediate width a token passes through in them (top-k experts).
    expert_params: int = 0
    expert_intermediate: int = 0

    @property
    def layer_params(self) -> int:
        """A decoder layer's linear weights: what NF4 quantizes and LoRA can target."""
        h = self.hidden
        return h * self.q_dim * 2 + h * self.kv_dim * 2 + 3 * h * self.intermediate

    @property
    def embed_params(self) -> int:
        heads = 2 if self.untied_head else 1
        return self.vocab * self.hidden * heads + self.extra_embed_params

    @property
    def params(self) -> int:
        decoder = self.layers * (self.layer_params + self.expert_params)
        return decoder + self.embed_params + self.vision_params


_SIGLIP = 416_866_032  # Gemma 3's SigLIP-400M vision tower (counted on the meta device)
_GEMMA_VOCAB = 262_208
# Gemma 4 26B-A4B and 31B: the 27-layer, 1152-wide tower (gated MLPs, a 2 x 10240 position table).
_GEMMA4_TOWER = 569_548_080


def _gemma3_projector(hidden: int) -> int:
    return 1152 * hidden + 1152  # mm_input_projection_weight and the soft-embedding norm


def _a(name: str, h: int, i: int, layers: int, q: int, kv: int, vocab: int, vision: float,
       image: int, **kw: Any) -> Arch:  # fmt: skip
    return Arch(name, True, h, i, layers, q, kv, vocab, int(vision), image, **kw)


# From each family's public config.json (text_config: hidden, intermediate, layers, heads x head
# dim, KV heads x head dim, vocabulary; vision_config for the tower). Image tokens: fixed per
# image where the family fixes them (Gemma, PaliGemma at 224 px, LLaVA-1.5), typical for a
# ~500x375 photo where they depend on its size (Qwen-VL, SmolVLM's tiles, LLaVA-NeXT's anyres).
# Gemma 4 31B mixes sliding layers (32 x 256 query, 16 x 256 KV) with one global layer in six
# (32 x 512 query, 4 x 512 keys shared with values): the dims below are the per-layer averages.
KNOWN: dict[str, Arch] = {
    **{
        f"gemma-3-{size}": _a(
            f"gemma-3-{size}",
            h,
            i,
            layers,
            q,
            kv,
            _GEMMA_VOCAB,
            _SIGLIP + _gemma3_projector(h),
            256,
            projector_params=_gemma3_projector(h),
        )
        for size, h, i, layers, q, kv in [
            ("4b", 2560, 10240, 34, 8 * 256, 4 * 256),
            ("12b", 3840, 15360, 48, 4096, 2048),
            ("27b", 5376, 21504, 62, 4096, 2048),
        ]
    },
    # E-series: 768-wide 16-layer vision tower and a ~300M audio tower; per-layer embeddings
    # of 256 per layer over the whole vocabulary.
    **{
        f"gemma-4-{size}": _a(
            f"gemma-4-{size}",
            h,
            4 * h,
            layers,
            2048,
            kv,
            262_144,
            460e6,
            280,
            extra_embed_params=262_144 * layers * 256,
            softcap=True,
        )
        for size, h, layers, kv in [("e2b", 1536, 35, 256), ("e4b", 2560, 42, 512)]
    },
    "gemma-4-31b": _a(
        "gemma-4-31b",
        5376,
        21504,
        60,
        9557,
        3584,
        262_144,
        _GEMMA4_TOWER + 5376 * 1152,
        280,
        softcap=True,
        projector_params=5376 * 1152,  # embed_vision
    ),
    # The mixture of experts (transformers' convert_gemma4_weights.py, variant gemma-4-26b-a4b):
    # 30 layers 2816 wide, 25 sliding (16 x 256 query, 8 x 256 KV) and 5 global (16 x 512
    # query, 2 x 512 keys shared with values); a dense (shared) MLP 2112 wide beside 128
    # experts of 704, 8 per token.
    "gemma-4-26b-a4b": _a(
        "gemma-4-26b-a4b",
        2816,
        2112,
        30,
        4779,
        1792,
        262_144,
        _GEMMA4_TOWER + 2816 * 1152,
        280,
        softcap=True,
        projector_params=2816 * 1152,
        expert_params=128 * 3 * 2816 * 704,
        expert_intermediate=8 * 704,
    ),
    "qwen2.5-vl-3b": _a(
        "qwen2.5-vl-3b",
        2048,
        11008,
        36,
        2048,
        256,
        151_936,
        670e6,
        234,
        projector_params=36_700_000,
    ),
    "qwen2.5-vl-7b": _a(
        "qwen2.5-vl-7b",
        3584,
        18944,
        28,
        3584,
        512,
        152_064,
        676e6,
        234,
        untied_head=True,
        projector_params=44_600_000,
    ),
    "qwen2.5-vl-32b": _a(
        "qwen2.5-vl-32b",
        5120,
        27648,
        64,
        5120,
        1024,
        152_064,
        676e6,
        234,
        untied_head=True,
        projector_params=52_400_000,
    ),
    "qwen2.5-vl-72b": _a(
        "qwen2.5-vl-72b",
        8192,
        29568,
        80,
        8192,
        1024,
        152_064,
        676e6,
        234,
        untied_head=True,
        projector_params=68_200_000,
    ),
    "qwen3-vl-2b": _a("qwen3-vl-2b", 2048, 6144, 28, 2048, 1024, 151_936, 405e6, 192),
    "qwen3-vl-4b": _a("qwen3-vl-4b", 2560, 9728, 36, 4096, 1024, 151_936, 405e6, 192),
    "qwen3-vl-8b": _a(
        "qwen3-vl-8b", 4096, 12288, 36, 4096, 1024, 151_936, 576e6, 192, untied_head=True
    ),
    "qwen3-vl-32b": _a(
        "qwen3-vl-32b", 5120, 25600, 64, 8192, 1024, 151_936, 576e6, 192, untied_head=True
    ),
    # SmolVLM: 64 tokens per 512-px tile, a ~500x375 photo resized to 1536 px: 12 tiles + 1.
    "smolvlm-256m": _a("smolvlm-256m", 576, 1536, 30, 576, 192, 49_280, 93e6, 832),
    "smolvlm-500m": _a("smolvlm-500m", 960, 2560, 32, 960, 320, 49_280, 93e6, 832),
    "smolvlm-instruct": _a("smolvlm-instruct", 2048, 8192, 24, 2048, 2048, 49_155, 430e6, 1053),
    "smolvlm2-256m": _a("smolvlm2-256m", 576, 1536, 30, 576, 192, 49_280, 93e6, 832),
    "smolvlm2-500m": _a("smolvlm2-500m", 960, 2560, 32, 960, 320, 49_280, 93e6, 832),
    "smolvlm2-2.2b": _a("smolvlm2-2.2b", 2048, 8192, 24, 2048, 2048, 49_280, 430e6, 1053),
    "paligemma-3b": _a("paligemma-3b", 2048, 16384, 18, 2048, 256, 257_216, 428e6, 256),
    "paligemma2-3b": _a(
        "paligemma2-3b", 2304, 9216, 26, 2048, 1024, 257_216, 428e6, 256, softcap=True
    ),
    "paligemma2-10b": _a(
        "paligemma2-10b", 3584, 14336, 42, 4096, 2048, 257_216, 428e6, 256, softcap=True
    ),
    "paligemma2-28b": _a(
        "paligemma2-28b", 4608, 36864, 46, 4096, 2048, 257_216, 428e6, 256, softcap=True
    ),
    "llava-1.5-7b": _a(
        "llava-1.5-7b",
        4096,
        11008,
        32,
        4096,
        4096,
        32_064,
        325e6,
        576,
        untied_head=True,
        projector_params=21_000_000,
    ),
    "llava-1.5-13b": _a(
        "llava-1.5-13b",
        5120,
        13824,
        40,
        5120,
        5120,
        32_064,
        330e6,
        576,
        untied_head=True,
        projector_params=31_500_000,
    ),
    "llava-v1.6-mistral-7b": _a(
        "llava-v1.6-mistral-7b",
        4096,
        14336,
        32,
        4096,
        1024,
        32_064,
        325e6,
        2160,
        untied_head=True,
        projector_params=21_000_000,
    ),
    "llava-v1.6-vicuna-7b": _a(
        "llava-v1.6-vicuna-7b",
        4096,
        11008,
        32,
        4096,
        4096,
        32_064,
        325e6,
        2160,
        untied_head=True,
        projector_params=21_000_000,
    ),
}


def arch_from_config(config: dict[str, Any]) -> Arch | None:
    """An architecture read from a config.json (a model no table knows); None when it lacks
    the language model's widths."""
    text = config.get("text_config") or config
    try:
        h = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        vocab = int(text.get("vocab_size") or config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    q, kv = _attention_dims(text, h, heads, layers)
    inter = int(text.get("intermediate_size") or 4 * h)
    experts = int(text.get("num_experts") or 0) if text.get("enable_moe_block", True) else 0
    moe = int(text.get("moe_intermediate_size") or 0)
    top_k = int(text.get("top_k_experts") or text.get("num_experts_per_tok") or 0)
    vision = config.get("vision_config") or {}
    vh = int(vision.get("hidden_size") or vision.get("embed_dim") or 0)
    projector = vh * h  # at least a linear map from the tower's width to the model's
    image = (
        config.get("mm_tokens_per_image")
        or config.get("image_seq_length")
        or config.get("vision_soft_tokens_per_image")
        or (
            (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
            if vision.get("image_size") and vision.get("patch_size")
            else 0
        )
    )
    return Arch(
        str(config.get("model_type") or "config.json"),
        True,
        h,
        inter,
        layers,
        q,
        kv,
        vocab,
        _vision_params(vision) + projector,
        int(image),
        untied_head=not text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)),
        softcap=text.get("final_logit_softcapping") is not None,
        projector_params=projector,
        expert_params=experts * 3 * h * moe,
        expert_intermediate=top_k * moe,
    )


# Vision towers whose blocks have a gated MLP (gate, up and down projections).
_GATED_VISION = {"gemma4_vision", "qwen2_5_vl_vision", "qwen2_5_vl"}


def _vision_params(vision: dict[str, Any]) -> int:
    vh = int(vision.get("hidden_size") or vision.get("embed_dim") or 0)
    vl = int(vision.get("num_hidden_layers") or vision.get("depth") or 0)
    vi = int(vision.get("intermediate_size") or 4 * vh)
    mlp = (3 if vision.get("model_type") in _GATED_VISION else 2) * vh * vi
    positions = 2 * int(vision.get("position_embedding_size") or 0) * vh  # Gemma 4's table
    return vl * (4 * vh * vh + mlp) + positions


def _attention_dims(text: dict[str, Any], h: int, heads: int, layers: int) -> tuple[int, int]:
    """(query, key-or-value) widths averaged over the layers: Gemma 4's global layers have
    wider heads, fewer KV heads and (attention_k_eq_v) no value projection, given by
    `per_layer_config` (transformers 5) or `global_head_dim` / `num_global_key_value_heads`."""
    head_dim = int(text.get("head_dim") or h // heads)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    types = text.get("layer_types") or []
    overrides = text.get("per_layer_config") or {}
    q_sum = kv_sum = 0
    for n in range(layers):
        full = n < len(types) and types[n] == "full_attention"
        d, k = head_dim, kv_heads
        if full and text.get("global_head_dim"):
            d = int(text["global_head_dim"])
            k = int(text.get("num_global_key_value_heads") or kv_heads)
        layer = overrides.get(str(n)) or {}
        d, k = int(layer.get("head_dim") or d), int(layer.get("num_key_value_heads") or k)
        q_sum += heads * d
        # Keys and values, counted as two projections of the average width.
        kv_sum += k * d * (1 if full and text.get("attention_k_eq_v") else 2)
    return round(q_sum / layers), round(kv_sum / layers / 2)


# "gemma-3-27b", "Qwen2.5-VL-7B", "SmolVLM-256M": a number and B or M, not glued to other
# letters or digits (so "A3B" in "30B-A3B" and "8x7b" are not read as sizes).
_SIZE = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)([bm])(?![a-z0-9])")


def model_size(
    model_id: str, config: dict[str, Any] | None = None
) -> tuple[int | None, Arch | None]:
    """(parameter count, architecture) from a model id, or its config.json when given; (None,
    None) when neither says."""
    lowered = model_id.lower()
    for key, arch in KNOWN.items():
        if key in lowered:
            return arch.params, arch
    read = arch_from_config(config) if config else None
    if read is not None:
        return read.params, read
    match = _SIZE.search(lowered.rsplit("/", 1)[-1])
    if not match:
        return None, None
    params = int(float(match.group(1)) * (1e9 if match.group(2) == "b" else 1e6))
    if params <= 0:
        return None, None
    return params, _generic_arch(params)


def _generic_arch(params: int) -> Arch:
    # A dense decoder has ~12·L·h² parameters and, across common models, L ≈ h / 128.
    hidden = max(256, round((params * 128 / 12) ** (1 / 3) / 128) * 128)
    layers = max(1, round(params / (12 * hidden * hidden)))
    return Arch("inferred", False, hidden, 4 * hidden, layers, hidden, hidden // 4, 150_000, 0)
