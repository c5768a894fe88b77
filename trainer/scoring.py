"""Evaluation by label scoring: the model's log-probability of every label's answer, over a
prompt it reads once.

Per batch of samples: one prefill over the prompt (image and instruction, left padded, KV cache
kept), then one forward over the label continuations of every (sample, label) pair, each row
reading its sample's cached prefix. The predicted label is the argmax of the *summed*
log-probabilities of the label's answer tokens, end-of-answer marker included. Summed, not
length-normalised: with the end marker scored, the sum is the model's probability of answering
exactly that label (what greedy generation approximates), and a label that is a prefix of
another ("Cocker" / "Cocker Spaniel") loses only if the model would go on writing. Dividing by
length would favour long labels and no longer be a probability. Every answer is a label, so the
"no label" rate is 0 by construction.

The continuation tokens come from the training collator (the same tokens the loss is computed
on), so scoring and training agree on what a label's answer is, for chat templates and for
prefix-LMs alike.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer import collator as collate
from trainer.data import Sample

# What the per-chunk copies of the prefix's KV cache may take: this fraction of the GPU's free
# memory (CPU: a fixed budget). More rows per forward, fewer launches.
CUDA_FREE_FRACTION = 0.4
CPU_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Continuations:
    """The label answers as token rows after the shared prompt prefix `prefix_ids`:
    `ids[l]` is fed, `scored[l]` marks the tokens whose log-probability counts."""

    prefix_ids: list[int]
    ids: list[list[int]]
    scored: list[list[bool]]


def continuations(train_collator: Any, labels: Sequence[str], sample: Sample) -> Continuations:
    """Every label's answer tokens, from the training collator run on `sample`'s image with each
    label. The shared prefix ends where the earliest answer starts (a tokenizer may merge the
    prompt's last token into an answer's first; then the merged token is scored as part of it)."""
    rows = []
    for label in labels:
        fake = Sample(sample.sample_id, label, sample.load)
        batch = train_collator([fake])
        ids = batch["input_ids"][0]
        mask = batch["labels"][0] != collate.IGNORE_INDEX
        length = int(batch["attention_mask"][0].sum())
        rows.append((ids[:length].tolist(), mask[:length].tolist()))
    start = min(m.index(True) for _, m in rows)
    first = rows[0][0][:start]
    if any(ids[:start] != first for ids, _ in rows):
        raise ValueError("the label answers do not share the prompt's tokens; cannot score them")
    return Continuations(first, [ids[start:] for ids, _ in rows], [m[start:] for _, m in rows])


def _row_budget(cache: Any, rows: int, device: torch.device) -> int:
    """How many (sample, label) rows one continuation forward may hold: each copies its
    sample's prefix cache."""
    per_row = sum(t.nbytes for t in _cache_tensors(cache)) / max(rows, 1)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory PyTorch's allocator holds but does not use (training's) is free to us too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = free * CUDA_FREE_FRACTION
    else:
        budget = CPU_CACHE_BYTES
    return max(1, int(budget // max(per_row, 1)))


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    out = []
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def _select(cache: Any, index: torch.Tensor) -> Any:
    """A cache holding rows `index` of `cache`, leaving `cache` itself untouched (each layer is
    a shallow copy whose tensors are replaced by the selected rows)."""
    sub = copy.copy(cache)
    sub.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in sub.layers:
        layer.batch_select_indices(index)
    return sub


def score_batch(
    model: Any, inputs: dict[str, Any], cont: Continuations, device: torch.device
) -> torch.Tensor:
    """(samples, labels) summed log-probabilities of each label's answer for one prompt batch
    (`inputs`: the processor's left-padded prompts, already on `device`)."""
    from transformers import DynamicCache

    cut = inputs["input_ids"].shape[1] - _prompt_tail(inputs, cont)
    prefix = {
        k: (v[:, :cut] if _per_token(k, v, inputs) else v)
        for k, v in inputs.items()
        if k != "labels"  # a prefix-LM processor (PaliGemma) returns some; nothing to learn here
    }
    attn = prefix["attention_mask"]
    positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(**prefix, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
    n, n_labels = attn.shape[0], len(cont.ids)
    width = max(len(ids) for ids in cont.ids)
    ids = torch.zeros(n_labels, width, dtype=torch.long, device=device)
    scored = torch.zeros(n_labels, width, dtype=torch.bool, device=device)
    for i, (row, sc) in enumerate(zip(cont.ids, cont.scored, strict=True)):
        ids[i, : len(row)] = torch.tensor(row, device=device)
        scored[i, : len(row)] = torch.tensor(sc, device=device)
    # Token 0 of each answer is predicted by the prefill's last position, token j by
    # continuation position j - 1; the last token is never fed.
    scores = first[:, ids[:, 0]] * scored[:, 0]  # (B, L)
    if width == 1:
        return scores
    pairs = torch.cartesian_prod(
        torch.arange(n, device=device), torch.arange(n_labels, device=device)
    )
    chunk = _row_budget(cache, n, device)
    end = positions[:, -1] + 1
    for lo in range(0, len(pairs), chunk):
        s, lab = pairs[lo : lo + chunk].unbind(-1)
        feed = ids[lab, :-1]
        mask = torch.cat(
            [
                attn[s],
                (torch.arange(width - 1, device=device) < _lengths(cont, lab) - 1).to(attn.dtype),
            ],
            dim=1,
        )
        pos = end[s, None] + torch.arange(width - 1, device=device)
        logits = model(
            input_ids=feed,
            attention_mask=mask,
            position_ids=pos,
            cache=_select(cache, s),
            use_cache=True,
        ).logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[lab, 1:, None])[..., 0]
        scores[s, lab] += (logp * scored[lab, 1:]).sum(-1)
    return scores


def _lengths(cont: Continuations, lab: torch.Tensor) -> torch.Tensor:
    lengths = torch.tensor([len(r) for r in cont.ids], device=lab.device)
    return lengths[lab][:, None]


def _prompt_tail(inputs: dict[str, Any], cont: Continuations) -> int:
    """Prompt tokens past the shared prefix (0 unless a tokenizer merged across the boundary);
    they are fed again as the head of every continuation."""
    row = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
    n = len(cont.prefix_ids)
    if len(row) < n or row[:n].tolist() != cont.prefix_ids:
        raise ValueError("the evaluation prompt is not the training prompt; cannot score labels")
    return len(row) - n


def _per_token(key: str, value: Any, inputs: dict[str, Any]) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 2
        and value.shape == inputs["input_ids"].shape
        and key != "pixel_values"
    )


def score_labels(
    model: Any,
    processor: Any,
    labels: Sequence[str],
    samples: Sequence[Sample],
    *,
    max_length: int,
    device: torch.device,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """(samples, labels) summed answer log-probabilities over the evaluation set."""
    from trainer.evaluate import autocast, to_device

    if not samples:
        return torch.zeros(0, len(labels))
    train_collator = collate.TrainCollator(processor, labels, max_length)
    by_size: dict[Any, Continuations] = {}
    float_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: list[tuple[int, torch.Tensor]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            for size, group in _by_image_size(chunk):
                if size not in by_size:
                    by_size[size] = continuations(train_collator, labels, group[0][1])
                batch = collate.eval_batch(processor, labels, [s for _, s in group])
                inputs = to_device(batch, device, float_dtype)
                with torch.inference_mode(), autocast(device):
                    scores = score_batch(model, inputs, by_size[size], device)
                out += [(start + i, row.cpu()) for (i, _), row in zip(group, scores, strict=True)]
            if on_batch:
                on_batch(min(start + batch_size, len(samples)), len(samples))
    finally:
        model.train(was_training)
    return torch.stack([row for _, row in sorted(out, key=lambda p: p[0])])


def _by_image_size(chunk: Sequence[Sample]) -> list[tuple[Any, list[tuple[int, Sample]]]]:
    """Samples grouped by image size: the number of image tokens (so the prompt's tokens) may
    depend on it (Qwen2-VL), and each group shares one set of continuations."""
    groups: dict[Any, list[tuple[int, Sample]]] = {}
    for i, s in enumerate(chunk):
        # The size without decoding: PIL reads it from the header.
        groups.setdefault(s.load().size, []).append((i, s))
    return list(groups.items())


def evaluate_by_scoring(
    model: Any,
    processor: Any,
    labels: Sequence[str],
    samples: Sequence[Sample],
    *,
    max_length: int,
    device: torch.device,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> Any:
    """Metrics of one scored pass; a prediction's raw answer is the label with its summed
    log-probability, so the run page shows how sure the model was."""
    import time

    from trainer.evaluate import compute_metrics

    started = time.perf_counter()
    scores = score_labels(
        model,
        processor,
        labels,
        samples,
        max_length=max_length,
        device=device,
        batch_size=batch_size,
        on_batch=on_batch,
    )
    seconds = time.perf_counter() - started
    best = scores.argmax(-1).tolist() if len(samples) else []
    predicted = [labels[i] for i in best]
    raw = [f"{labels[i]} (log p {float(scores[k, i]):.3f})" for k, i in enumerate(best)]
    metrics = compute_metrics(
        labels, [s.sample_id for s in samples], [s.label for s in samples], predicted, raw
    )
    metrics.seconds = seconds
    metrics.samples_per_second = len(samples) / seconds if seconds > 0 else None
    return metrics
