"""Evaluation: greedy answers in batches, the label found in each, and the metrics over them.

Metrics are scikit-learn's, computed locally (the original script's `evaluate.load` needs the
Hub). An answer naming no label is wrong for its true class but is not a class of its own: it
lowers that class's recall, it is never in the macro average, and it gets its own column
("no label") at the end of the confusion matrix.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from trainer import collator, prompts
from trainer.contract.chat import strip_thinking
from trainer.contract.events import ClassMetrics, Metrics, Prediction
from trainer.data import Sample
from trainer.features import FeatureCache
from trainer.scoring import Memo, evaluate_by_scoring

NO_LABEL = "no label"
_UNKNOWN = "\x00unknown"  # sklearn needs a value for "no label" that no class can be named
MAX_RAW_ANSWER = 500
# CPU memory for the evaluation images' vision features (Gemma 3: 9.4 MB an image, so ~870).
EVAL_FEATURE_BYTES = 8 * 2**30


def normalize(text: str) -> str:
    """Lower case, underscores and hyphens as spaces, single spaces: "English_cocker-Spaniel"
    and "english cocker spaniel" compare equal."""
    return " ".join(re.sub(r"[_\-]+", " ", text.lower()).split())


class LabelMatcher:
    """Finds the label an answer names: the one it writes first. A model that answers "one"
    and then echoes the prompt's list ("one. labels: zero, one, two, three") named "one", not the
    longer "three" later in the echo. At the same position the longer label wins, so "English
    Cocker Spaniel" beats "English"; a label must stand as whole words ("one" is not in
    "none")."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        norm = [(normalize(label), label) for label in self.labels]
        self._patterns = [
            (re.compile(rf"(?<!\w){re.escape(n)}(?!\w)"), label)
            for n, label in sorted(norm, key=lambda p: -len(p[0]))
            if n
        ]

    def __call__(self, answer: str) -> str | None:
        text = normalize(answer)
        best: tuple[int, int, str] | None = None
        for pattern, label in self._patterns:
            m = pattern.search(text)
            if m is None:
                continue
            key = (m.start(), -len(m.group(0)), label)
            if best is None or key[:2] < best[:2]:
                best = key
        return best[2] if best else None


def compute_metrics(
    labels: Sequence[str],
    sample_ids: Sequence[str],
    true: Sequence[str],
    predicted: Sequence[str | None],
    raw: Sequence[str],
) -> Metrics:
    """Metrics over one evaluation pass. Macro F1 averages over the classes that occur among the
    true labels (with a stratified evaluation set: all of them once it holds one of each)."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    classes = list(labels)
    n = len(true)
    y_true = list(true)
    y_pred = [p if p is not None else _UNKNOWN for p in predicted]
    present = [c for c in classes if c in set(y_true)]
    if n:
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, zero_division=0
        )
        macro = float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
        # Rows: true classes; columns: predicted classes then "no label". The unknown row is
        # always zero (no sample is truly unknown), so it is dropped.
        matrix = confusion_matrix(y_true, y_pred, labels=[*classes, _UNKNOWN])[:-1].tolist()
    else:
        precision = recall = f1 = [0.0] * len(classes)
        support = [0] * len(classes)
        macro = 0.0
        matrix = [[0] * (len(classes) + 1) for _ in classes]
    correct = [t == p for t, p in zip(y_true, predicted, strict=True)]
    return Metrics(
        accuracy=sum(correct) / n if n else 0.0,
        macro_f1=macro,
        unknown_rate=sum(p is None for p in predicted) / n if n else 0.0,
        num_samples=n,
        labels=classes,
        per_class=[
            ClassMetrics(
                label=c,
                precision=float(precision[i]),
                recall=float(recall[i]),
                f1=float(f1[i]),
                support=int(support[i]),
            )
            for i, c in enumerate(classes)
        ],
        confusion_matrix=[[int(v) for v in row] for row in matrix],
        predictions=[
            Prediction(
                sample_id=sid,
                true_label=t,
                predicted_label=p,
                raw_answer=r[:MAX_RAW_ANSWER],
                correct=ok,
            )
            for sid, t, p, r, ok in zip(sample_ids, true, predicted, raw, correct, strict=True)
        ],
    )


def clean_answer(decoded: str, specials: Sequence[str]) -> str:
    """The text of an answer: its thinking channels dropped (decoded with the special tokens
    kept, since those mark the channels), then the special tokens themselves."""
    text = strip_thinking(decoded)
    for tok in sorted(specials, key=len, reverse=True):
        text = text.replace(tok, "")
    return text.strip()


def to_device(batch: Any, device: torch.device, float_dtype: torch.dtype) -> dict[str, Any]:
    """Move a processor batch to `device`; floating tensors (pixels) take the model's dtype."""
    out = {}
    for key, value in dict(batch).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(float_dtype)
        out[key] = value
    return out


def autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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
