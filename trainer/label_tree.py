"""Every label's answer in one forward: the answers as a token tree after the shared prompt, and
the attention masks that let each tree node see the prompt and its own ancestors only.

Labels share their first tokens ("English Cocker Spaniel" / "English Setter"), so the tree feeds
each distinct answer prefix once. Node `i` holds one answer token at position
`prompt_end + depth[i]` (the position it has in `prompt + that label's answer`, so rotary
embeddings are the brute-force ones) and attends to the prompt's cached keys plus the nodes on its
own path: its logits are those a forward over `prompt + that one answer` would give.

The masks are per kind of cache layer: a full-attention layer sees the whole cached prompt; a
sliding-window layer (Gemma 3, Qwen2 with `use_sliding_window`) keeps only the last
`window - 1` prompt keys in its cache and a node at depth d must not see the oldest d of them,
the window rule `key > query - window` of transformers' own sliding mask. Where the two kinds'
masks differ (a prompt longer than the window) the model gets a dict keyed by layer type (Gemma
2/3/4 and the Qwen2 family accept a prepared mapping; PaliGemma 2's wrapper does not, so it is
scored only while its 4,096-token window holds the prompt); else one 4-D tensor, which
transformers' mask builders return as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LabelTree:
    """`tokens[i]` is fed at depth `depth[i]`; `ancestors[i, j]`: node j is node i or above it.
    Scored token k is `target[k]` of label `label[k]`, predicted by node `predictor[k]` (-1: the
    prompt's last position)."""

    tokens: list[int]
    depth: list[int]
    ancestors: torch.Tensor
    predictor: list[int]
    target: list[int]
    label: list[int]


def build(ids: list[list[int]], scored: list[list[bool]]) -> LabelTree:
    """The tree of the label rows `ids` (token j of a row is predicted by token j - 1, token 0
    by the prompt); only tokens before a row's last scored one are fed."""
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    depth: list[int] = []
    parent: list[int] = []
    predictor: list[int] = []
    target: list[int] = []
    label: list[int] = []
    for lab, (row, marks) in enumerate(zip(ids, scored, strict=True)):
        if not any(marks):
            raise ValueError(f"label {lab} has no answer tokens to score")
        last = max(j for j, m in enumerate(marks) if m)
        node = -1
        for j in range(last + 1):
            if marks[j]:
                predictor.append(node)
                target.append(row[j])
                label.append(lab)
            if j == last:
                break
            key = tuple(row[: j + 1])
            if key not in index:
                index[key] = len(tokens)
                tokens.append(row[j])
                depth.append(j)
                parent.append(node)
            node = index[key]
    ancestors = torch.eye(len(tokens), dtype=torch.bool)
    for i, p in enumerate(parent):  # a parent always precedes its children
        if p >= 0:
            ancestors[i] |= ancestors[p]
    return LabelTree(tokens, depth, ancestors, predictor, target, label)


def _kind_mask(
    tree: LabelTree,
    cached: int,
    window: int | None,
    prompt_end: int,
    prompt_mask: torch.Tensor,
) -> torch.Tensor:
    """(batch, 1, nodes, cached + nodes) bool: what each node sees in one kind of layer."""
    device = prompt_mask.device
    depth = torch.tensor(tree.depth, device=device)
    query = prompt_end + depth
    keys = torch.arange(prompt_end - cached, prompt_end, device=device)
    seen = prompt_mask[:, -cached:].bool()[:, None, :] if cached else prompt_mask[:, :0].bool()
    prompt = seen.expand(-1, len(tree.tokens), -1)  # (B, N, C)
    own = tree.ancestors.to(device)
    if window is not None:
        prompt = prompt & (keys[None, :] > query[:, None] - window)
        own = own & (depth[:, None] - depth[None, :] < window)
    full = torch.cat([prompt, own.expand(prompt.shape[0], -1, -1)], dim=-1)
    return full[:, None]


def _attention_format(mask: torch.Tensor, impl: str | None, dtype: torch.dtype) -> torch.Tensor:
    """SDPA takes the boolean mask; eager attention adds it to the scores."""
    if impl in (None, "sdpa"):
        return mask
    if impl == "eager":
        blocked = torch.finfo(dtype).min
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, blocked)
    raise ValueError(
        f"label scoring needs sdpa or eager attention (a custom mask); this model uses {impl}"
    )


def masks(
    tree: LabelTree, cache: Any, config: Any, prompt_end: int, prompt_mask: torch.Tensor
) -> Any:
    """The continuation's attention mask for `cache` (just filled by the prompt's forward): one
    4-D tensor, or a dict by layer type when layers differ in what they cached."""
    text = config.get_text_config()
    kinds: dict[bool, tuple[int, int | None]] = {}
    for layer in cache.layers:
        if not isinstance(getattr(layer, "keys", None), torch.Tensor):
            continue  # a layer that reads another's cache (KV sharing) holds none
        sliding = bool(getattr(layer, "is_sliding", False))
        window = getattr(layer, "sliding_window", None) if sliding else None
        kinds.setdefault(sliding, (int(layer.keys.shape[-2]), window))
    impl = getattr(text, "_attn_implementation", None)
    dtype = torch.float32 if prompt_mask.device.type == "cpu" else torch.bfloat16
    built = {
        sliding: _attention_format(
            _kind_mask(tree, cached, window, prompt_end, prompt_mask), impl, dtype
        )
        for sliding, (cached, window) in kinds.items()
    }
    first = next(iter(built.values()))
    if all(m.shape == first.shape and torch.equal(m, first) for m in built.values()):
        # The window hides nothing here: one tensor, which every family's forward takes
        # (PaliGemma 2's builds its own per-type masks from it and would refuse a dict).
        return first
    types = getattr(text, "layer_types", None) or []
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown or not types:
        raise ValueError(f"label scoring cannot mask layers of type {sorted(unknown) or '?'}")
    return {"full_attention": built[False], "sliding_attention": built[True]}
