"""Evaluation: one pass of a loaded model over the evaluation split, by label scoring
(trainer.scoring, the default) or by greedy answers in batches with the label found in each;
the metrics over it are trainer.metrics'."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trainer import collator, prompts
from trainer.contract.chat import strip_thinking
from trainer.contract.events import Metrics
from trainer.data import Sample
from trainer.device import autocast, to_device
from trainer.features import FeatureCache
from trainer.metrics import LabelMatcher, compute_metrics
from trainer.scoring import Memo, evaluate_by_scoring

# CPU memory for the evaluation images' vision features (Gemma 3: 9.4 MB an image, so ~870).
EVAL_FEATURE_BYTES = 8 * 2**30


def clean_answer(decoded: str, specials: Sequence[str]) -> str:
    """The text of an answer: its thinking channels dropped (decoded with the special tokens
    kept, since those mark the channels), then the special tokens themselves."""
    text = strip_thinking(decoded)
    for tok in sorted(specials, key=len, reverse=True):
        text = text.replace(tok, "")
    return text.strip()


def generate_answers(
    model: Any,
    processor: Any,
    labels: Sequence[str],
    samples: Sequence[Sample],
    *,
    device: torch.device,
    batch_size: int,
    max_new_tokens: int,
    stop_ids: list[int],
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    tokenizer = getattr(processor, "tokenizer", processor)
    specials = prompts.special_tokens(processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    float_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = to_device(collator.eval_batch(processor, labels, chunk), device, float_dtype)
            with torch.inference_mode(), autocast(device):
                out = model.generate(
                    **batch,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                )
            new = out[:, batch["input_ids"].shape[1] :]
            answers += [clean_answer(a, specials) for a in tokenizer.batch_decode(new)]
            if on_batch:
                on_batch(len(answers), len(samples))
    finally:
        model.train(was_training)
    return answers


def evaluate(
    model: Any,
    processor: Any,
    labels: Sequence[str],
    samples: Sequence[Sample],
    *,
    device: torch.device,
    batch_size: int,
    max_new_tokens: int,
    stop_ids: list[int],
    on_batch: Callable[[int, int], None] | None = None,
) -> Metrics:
    started = time.perf_counter()
    answers = generate_answers(
        model,
        processor,
        labels,
        samples,
        device=device,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        on_batch=on_batch,
    )
    seconds = time.perf_counter() - started
    match = LabelMatcher(labels)
    metrics = compute_metrics(
        labels,
        [s.sample_id for s in samples],
        [s.label for s in samples],
        [match(a) for a in answers],
        answers,
    )
    metrics.seconds = seconds
    metrics.samples_per_second = len(samples) / seconds if seconds > 0 else None
    return metrics


class Evaluator:
    """One evaluation pass of a loaded model over the evaluation split, as the pipeline runs it
    before and after training; `on_metrics(stage, metrics)` logs and reports it."""

    def __init__(
        self,
        loaded: Any,
        spec: Any,
        splits: Any,
        stop_ids: list[int],
        check: Callable[[], None],
        on_metrics: Callable[[str, Metrics], None],
    ) -> None:
        self.loaded, self.spec, self.splits = loaded, spec, splits
        self.stop_ids, self.check, self.on_metrics = stop_ids, check, on_metrics
        # The final evaluation scores the baseline's images through the same frozen tower.
        self.features = FeatureCache.for_model(loaded.model, max_bytes=EVAL_FEATURE_BYTES)
        self.memo = Memo()  # what the baseline's label scoring leaves to the final one

    def __call__(self, stage: str) -> Metrics:
        if getattr(self.spec, "eval_mode", "generate") == "score":
            metrics = evaluate_by_scoring(
                self.loaded.model,
                self.loaded.processor,
                self.splits.labels,
                self.splits.eval,
                max_length=self.spec.max_length,
                device=self.loaded.device,
                batch_size=self.spec.eval_batch_size,
                on_batch=lambda done, total: self.check(),
                features=self.features,
                memo=self.memo,
            )
            self.on_metrics(stage, metrics)
            return metrics
        metrics = evaluate(
            self.loaded.model,
            self.loaded.processor,
            self.splits.labels,
            self.splits.eval,
            device=self.loaded.device,
            batch_size=self.spec.eval_batch_size,
            max_new_tokens=self.spec.max_new_tokens,
            stop_ids=self.stop_ids,
            on_batch=lambda done, total: self.check(),
        )
        self.on_metrics(stage, metrics)
        return metrics
