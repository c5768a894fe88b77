"""A frozen vision tower's outputs, computed once per image and reused in later epochs.

With the tower frozen (no LoRA on it, `lora_vision: false`) and no augmentation (the data
pipeline has none: an image decodes to the same pixels every epoch), the tower's output for an
image never changes, yet a plain loop recomputes it every epoch: a third of a Gemma 3 step's
FLOPs. The cache wraps the tower's `forward`: for a batch whose every image is cached it returns
the stored rows, for a batch with some images cached it runs the tower on the others only, else
it runs the tower; it stores the rows it may keep. Rows live in CPU memory
up to `max_bytes` (Gemma 3: 9.4 MB an image), first come first kept; past that, images are
simply computed. The projector after the tower is trained, so it is not cached.

Keys are the samples' ids, set per batch (`keys`); outside a `keys` block, or for an output the
cache does not know how to split by row, the tower runs as usual.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

DEFAULT_MAX_BYTES = 16 * 2**30


def vision_tower(model: Any) -> torch.nn.Module | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    for name in ("vision_tower", "vision_model", "visual"):
        tower = getattr(inner, name, None)
        if isinstance(tower, torch.nn.Module):
            return tower
    return None


class FeatureCache:
    def __init__(self, tower: torch.nn.Module, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.tower = tower
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._rows: dict[str, torch.Tensor] = {}
        self._keys: list[str] | None = None
        self._bare = False
        self._seen = False  # the tower's output has been split by row once
        # One pixel of the tower's input (its channels and dtype), once it has run on a batch
        # split by row: what a batch of cached images stands in with (trainer.scoring.Memo).
        self.sample_pixels: torch.Tensor | None = None
        self._forward = tower.forward
        tower.forward = self._cached

    @classmethod
    def for_model(cls, model: Any, max_bytes: int = DEFAULT_MAX_BYTES) -> FeatureCache | None:
        """A cache for `model`'s vision tower, or None when it is trained (then its output
        changes with every step) or the model has none."""
        tower = vision_tower(model)
        if tower is None or any(p.requires_grad for p in tower.parameters()):
            return None
        return cls(tower, max_bytes)

    def holds(self, ids: Sequence[str]) -> bool:
        return all(k in self._rows for k in ids)

    @contextmanager
    def keys(self, ids: Sequence[str] | None) -> Iterator[None]:
        self._keys = list(ids) if ids is not None else None
        try:
            yield
        finally:
            self._keys = None

    def _cached(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        keys = self._keys
        if keys is None or len(keys) != pixel_values.shape[0]:
            return self._forward(pixel_values, *args, **kwargs)
        known = [k in self._rows for k in keys]
        if all(known):
            self.hits += len(keys)
            rows = torch.stack([self._rows[k] for k in keys]).to(pixel_values.device)
            return rows if self._bare else _wrap(rows)
        per_row_only = not any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values()))
        if any(known) and self._seen and per_row_only:
            return self._partial(pixel_values, keys, known, args, kwargs)
        self.misses += len(keys)
        out = self._forward(pixel_values, *args, **kwargs)
        self._bare = isinstance(out, torch.Tensor)
        hidden = _hidden(out)
        if hidden is not None and hidden.shape[0] == len(keys):
            self._seen = True
            if self.sample_pixels is None and pixel_values.dim() == 4:
                self.sample_pixels = torch.zeros(
                    (1, pixel_values.shape[1], 1, 1), dtype=pixel_values.dtype
                )
            self._store(keys, hidden)
        return out

    def _partial(
        self, pixels: torch.Tensor, keys: list[str], known: list[bool], args: Any, kwargs: Any
    ) -> Any:
        """Run the tower on the uncached images only (a data set larger than the bound keeps
        part of its images: without this, a batch would almost never be all cached)."""
        missing = [i for i, k in enumerate(known) if not k]
        hidden = _hidden(self._forward(pixels[missing], *args, **kwargs))
        if hidden is None or hidden.shape[0] != len(missing):
            return self._forward(pixels, *args, **kwargs)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        self._store([keys[i] for i in missing], hidden)
        computed = dict(zip(missing, hidden, strict=True))
        rows = torch.stack(
            [
                computed[i] if i in computed else self._rows[k].to(pixels.device)
                for i, k in enumerate(keys)
            ]
        )
        return rows if self._bare else _wrap(rows)

    def _store(self, keys: list[str], hidden: torch.Tensor) -> None:
        for k, row in zip(keys, hidden.detach(), strict=True):
            size = row.numel() * row.element_size()
            if k not in self._rows and self.bytes + size <= self.max_bytes:
                self._rows[k] = row.to("cpu", copy=True)
                self.bytes += size


def _hidden(out: Any) -> torch.Tensor | None:
    """The tower's per-image output, when it is one tensor of (images, ...) rows: a bare tensor,
    or a model output whose only tensor the caller reads is `last_hidden_state` (SigLIP, CLIP
    and their kin as Gemma 3, LLaVA and PaliGemma use them)."""
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    others = [getattr(out, n, None) for n in ("pooler_output", "hidden_states", "attentions")]
    if not isinstance(hidden, torch.Tensor) or any(o is not None for o in others):
        return None  # more than one tensor to keep: not cached
    return hidden


def _wrap(rows: torch.Tensor) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(last_hidden_state=rows)
