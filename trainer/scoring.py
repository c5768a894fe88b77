"""Evaluation by label scoring: the model's log-probability of every label's answer, over a
prompt it reads once.

Per batch of samples whose prompts are the same tokens: one forward over the prompt (image and
instruction, KV cache kept, the model's own attention mask), then ONE forward over every label's
answer at once, the answers packed as a token tree over that cache with a mask that lets each
answer token see the prompt and its own answer only (trainer.label_tree). So a sample costs its
prompt plus the label tree's tokens (~150 for 37 pet breeds), whatever the number of labels.
The predicted label is the argmax of the *summed*
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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from trainer import collator as collate
from trainer import label_tree
from trainer.data import Sample
from trainer.device import autocast, to_device
from trainer.features import FeatureCache
from trainer.metrics import compute_metrics

# What one continuation forward's logits (and the copy of its rows' prompt cache) may take:
# this fraction of the GPU's free memory (CPU: a fixed budget). More rows per forward, fewer
# launches; the rows of one forward all share one label tree.
CUDA_FREE_FRACTION = 0.4
CPU_BUDGET_BYTES = 1 << 30
# Rows of the (rows, nodes, vocabulary) logits turned into fp32 log-probabilities at a time.
LOGSUMEXP_BYTES = 1 << 30


@dataclass(frozen=True)
class Continuations:
    """The label answers as token rows after the shared prompt prefix `prefix_ids`:
    `ids[l]` is fed, `scored[l]` marks the tokens whose log-probability counts; `tree` is the
    same rows as one token tree (trainer.label_tree)."""

    prefix_ids: list[int]
    ids: list[list[int]]
    scored: list[list[bool]]
    tree: label_tree.LabelTree


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
    ids = [r[start:] for r, _ in rows]
    scored = [m[start:] for _, m in rows]
    return Continuations(first, ids, scored, label_tree.build(ids, scored))


def _row_budget(cache: Any, rows: int, nodes: int, vocab: int, device: torch.device) -> int:
    """How many sample rows one continuation forward may hold: each gets its logits over the
    tree's nodes and (when the rows are a subset) a copy of its prompt cache."""
    per_row = sum(t.nbytes for t in _cache_tensors(cache)) / max(rows, 1)
    per_row += nodes * vocab * 2 * 2  # bf16 logits, and as much again for the model's head
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory PyTorch's allocator holds but does not use (training's) is free to us too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = free * CUDA_FREE_FRACTION
    else:
        budget = CPU_BUDGET_BYTES
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
        if isinstance(getattr(layer, "keys", None), torch.Tensor):
            layer.batch_select_indices(index)
    return sub


def _log_probs(logits: torch.Tensor, nodes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(rows, k) fp32 log-probabilities of `targets[k]` after node `nodes[k]`, the fp32
    log-softmax taken over a few rows at a time (the whole (rows, nodes, 262k) tensor in fp32
    would be the largest of the evaluation)."""
    per_row = logits.shape[1] * logits.shape[2] * 4
    step = max(1, LOGSUMEXP_BYTES // max(per_row, 1))
    out = []
    for lo in range(0, logits.shape[0], step):
        rows = logits[lo : lo + step]
        lse = torch.logsumexp(rows.float(), dim=-1)  # (r, N)
        out.append(rows[:, nodes, targets].float() - lse[:, nodes])
    return torch.cat(out)


@dataclass
class Memo:
    """What a scoring pass leaves to the next one over the same samples (the final evaluation
    after the baseline): the label continuations by prompt (37 collator runs of an image each,
    once per prompt rather than once per pass), and the prompt batch's text when every image
    gives the same prompt tokens (Gemma 3 resizes every image to one size). With that text, a
    batch whose every image the frozen tower's cache holds is made without decoding an image:
    measured on the H200, preparing a batch took 15-18 ms of CPU a sample, in a thread that
    competes with the one feeding the GPU (bench/results/gpu_trainer_v4/)."""

    continuations: dict[tuple[int, ...], Continuations] = field(default_factory=dict)
    text: dict[str, torch.Tensor] | None = None  # one row of the uniform prompt batch
    mixed: bool = False  # some chunk's prompts differed: the text is not reused

    def remember(self, groups: list[tuple[list[int], Any]], size: int) -> None:
        """Keep a chunk's prompt text when the chunk was one uniform batch; any chunk that was
        not, or whose text differs from the kept one, ends the reuse for good."""
        batch = groups[0][1]
        text = {k: v[:1].clone() for k, v in batch.items() if _per_token(k, v, batch)}
        # Anything beside the text and the pixels (image sizes, grids) is not rebuilt here.
        if len(groups) != 1 or len(groups[0][0]) != size or set(batch) - {*text, "pixel_values"}:
            self.mixed = True
        elif self.text is None:
            self.text = text
        elif text.keys() != self.text.keys() or any(
            not torch.equal(v, self.text[k]) for k, v in text.items()
        ):
            self.mixed = True

    def batch_without_images(
        self, ids: list[str], features: FeatureCache | None
    ) -> dict[str, torch.Tensor] | None:
        """The prompt batch of samples `ids` when the tower's cache holds all their outputs,
        else None. The pixel values stand in by their number only (the cache answers by sample
        id, trainer.features); one pixel each, so that a tower that did run on them would
        fail, not score noise."""
        if features is None or self.text is None or self.mixed:
            return None
        pixels = features.sample_pixels
        if pixels is None or not features.holds(ids):
            return None
        batch = {k: v.expand(len(ids), -1).clone() for k, v in self.text.items()}
        batch["pixel_values"] = pixels.expand(len(ids), -1, -1, -1).clone()
        return batch


class _PromptPositions:
    """The position ids the model gives the prompt's language-model forward (a hook on the
    decoder): families differ (PaliGemma counts from 1, Qwen2-VL's M-RoPE puts text after an
    image at index + delta on three axes), and the answer continues from the last one."""

    def __init__(self, model: Any) -> None:
        self.seen: torch.Tensor | None = None
        self.model = model

    def __enter__(self) -> _PromptPositions:
        def hook(_module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            self.seen = kwargs.get("position_ids")

        self.handle = self.model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()

    def after(self, length: int, rows: int) -> torch.Tensor:
        """(rows,) the position of the token after the prompt (`length` tokens, no padding)."""
        seen = self.seen
        if seen is None:  # the decoder's own default: 0, 1, 2, ...
            return torch.full((rows,), length)
        # (B, L) text positions, or (3 or 4, B, L) M-RoPE ones: text continues past the largest.
        last = seen[..., -1].reshape(-1, seen.shape[-2]).amax(0) if seen.dim() == 3 else seen[:, -1]
        return last.expand(rows) + 1 if last.numel() == 1 else last + 1


def score_batch(
    model: Any, inputs: dict[str, Any], cont: Continuations, device: torch.device
) -> torch.Tensor:
    """(samples, labels) summed log-probabilities of each label's answer for one prompt batch
    (`inputs`: the processor's prompts, on `device`, every row the same tokens: no padding).

    Two forwards: the prompt (the model builds its own mask: bidirectional image blocks, a
    prefix-LM's prefix), then every label's answer at once as a token tree over the prompt's
    cache (trainer.label_tree)."""
    from transformers import DynamicCache

    cut = inputs["input_ids"].shape[1] - _prompt_tail(inputs, cont)
    prefix = {
        k: (v[:, :cut] if _per_token(k, v, inputs) else v)
        for k, v in inputs.items()
        if k != "labels"  # a prefix-LM processor (PaliGemma) returns some; nothing to learn here
    }
    attn = prefix["attention_mask"]
    cache = DynamicCache(config=model.config)
    # No position ids: the model's own, as in training.
    with _PromptPositions(model) as positions:
        out = model(**prefix, cache=cache, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
    tree = cont.tree
    n = attn.shape[0]
    pred = torch.tensor(tree.predictor, device=device)
    target = torch.tensor(tree.target, device=device)
    label = torch.tensor(tree.label, device=device)
    scores = torch.zeros(n, len(cont.ids), device=device)
    root = pred < 0
    scores.index_add_(1, label[root], first[:, target[root]])
    if not tree.tokens:
        return scores
    depth = torch.tensor(tree.depth, device=device)
    start = positions.after(cut, n).to(device)
    feed = torch.tensor(tree.tokens, device=device)
    chunk = _row_budget(cache, n, len(tree.tokens), first.shape[-1], device)
    for lo in range(0, n, chunk):
        rows = torch.arange(lo, min(lo + chunk, n), device=device)
        sub = cache if len(rows) == n else _select(cache, rows)
        mask = label_tree.masks(tree, sub, model.config, cut, attn[rows])
        logits = model(
            input_ids=feed[None, :].expand(len(rows), -1),
            attention_mask=mask,
            position_ids=start[rows, None] + depth[None, :],
            cache=sub,
            use_cache=True,
        ).logits
        logp = _log_probs(logits, pred[~root], target[~root])
        scores[rows] += torch.zeros_like(scores[rows]).index_add_(1, label[~root], logp)
    return scores


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
    features: FeatureCache | None = None,
    memo: Memo | None = None,
) -> torch.Tensor:
    """(samples, labels) summed answer log-probabilities over the evaluation set. The next
    batch's images are decoded and processed in a thread while the GPU scores this one.
    `features`: a frozen vision tower's cache (the final evaluation reads the images the
    baseline's encoded); `memo`: what an earlier pass over these samples left (Memo)."""
    if not samples:
        return torch.zeros(0, len(labels))
    train_collator = collate.TrainCollator(processor, labels, max_length)
    memo = memo if memo is not None else Memo()
    float_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: list[tuple[int, torch.Tensor]] = []
    starts = range(0, len(samples), batch_size)
    was_training = model.training
    model.eval()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            # Every processor call happens in this one thread: a fast tokenizer used from two
            # threads at once fails ("Already borrowed").
            prepare = partial(_prepared, processor, labels, train_collator, memo, features)
            ahead = pool.submit(prepare, samples[0:batch_size])
            for start in starts:
                groups = ahead.result()
                nxt = start + batch_size
                if nxt < len(samples):
                    ahead = pool.submit(prepare, samples[nxt : nxt + batch_size])
                for rows, batch, cont in groups:
                    inputs = to_device(batch, device, float_dtype)
                    ids = [samples[start + i].sample_id for i in rows]
                    cached = features.keys(ids) if features else nullcontext()
                    with torch.inference_mode(), autocast(device), cached:
                        scores = score_batch(model, inputs, cont, device).cpu()
                    out += [(start + i, row) for i, row in zip(rows, scores, strict=True)]
                if on_batch:
                    on_batch(min(start + batch_size, len(samples)), len(samples))
    finally:
        model.train(was_training)
    return torch.stack([row for _, row in sorted(out, key=lambda p: p[0])])


def _prepared(
    processor: Any,
    labels: Sequence[str],
    train_collator: Any,
    memo: Memo,
    features: FeatureCache | None,
    chunk: Sequence[Sample],
) -> list[tuple[list[int], Any, Continuations]]:
    """`chunk`'s prompt batches with their label continuations (computed once per prompt);
    without decoding its images when the tower's cache holds them all (Memo)."""
    cached = memo.batch_without_images([s.sample_id for s in chunk], features)
    if cached is not None:
        key = tuple(cached["input_ids"][0].tolist())
        return [(list(range(len(chunk))), cached, memo.continuations[key])]
    groups = _uniform_groups(processor, labels, chunk)
    memo.remember(groups, len(chunk))
    out = []
    for rows, batch in groups:
        key = tuple(batch["input_ids"][0].tolist())
        if key not in memo.continuations:
            memo.continuations[key] = continuations(train_collator, labels, chunk[rows[0]])
        out.append((rows, batch, memo.continuations[key]))
    return out


def _uniform(batch: Any) -> bool:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return bool(mask.all()) and bool((ids == ids[:1]).all())


def _uniform_groups(
    processor: Any, labels: Sequence[str], chunk: Sequence[Sample]
) -> list[tuple[list[int], Any]]:
    """`chunk`'s prompts as processor batches whose rows are the same tokens (one label tree
    each, no padding): the whole chunk when its images give the same number of image tokens
    (Gemma 3 resizes every image to one size), else one batch per image size (Qwen2-VL's
    token count follows the size), else one per sample."""
    whole = collate.eval_batch(processor, labels, chunk)
    if _uniform(whole):
        return [(list(range(len(chunk))), whole)]
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(chunk):
        # The size without decoding: PIL reads it from the header.
        groups.setdefault(s.load().size, []).append(i)
    out = []
    for rows in groups.values():
        batch = collate.eval_batch(processor, labels, [chunk[i] for i in rows])
        if _uniform(batch):
            out.append((rows, batch))
        else:
            out += [([i], collate.eval_batch(processor, labels, [chunk[i]])) for i in rows]
    return out


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
    features: FeatureCache | None = None,
    memo: Memo | None = None,
) -> Any:
    """Metrics of one scored pass; a prediction's raw answer is the label with its summed
    log-probability, so the run page shows how sure the model was."""
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
        features=features,
        memo=memo,
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
