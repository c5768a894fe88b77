"""Metrics of one evaluation pass, and the label an answer names.

Metrics are scikit-learn's, computed locally (the original script's `evaluate.load` needs the
Hub). An answer naming no label is wrong for its true class but is not a class of its own: it
lowers that class's recall, it is never in the macro average, and it gets its own column
("no label") at the end of the confusion matrix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from trainer.contract.events import ClassMetrics, Metrics, Prediction

NO_LABEL = "no label"
_UNKNOWN = "\x00unknown"  # sklearn needs a value for "no label" that no class can be named
MAX_RAW_ANSWER = 500


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
