"""Quality gates of a template's runs: pure functions of the figures, no database, no clock.

The thresholds (minimum accuracy and macro F1, maximum unknown rate) compare one run with fixed
numbers. The champion checks compare the run with the template's current champion on the
evaluation samples both have seen, matched by `sample_id`:

* "no worse than the champion" is McNemar's test on paired per-sample correctness. Only the
  discordant samples carry information: `b` the champion got right and the new run got wrong,
  `c` the other way round. If both models were equally good, each discordant sample would be a
  fair coin, so `b ~ Binomial(b + c, 1/2)`; the gate fails when so many losses are unlikely
  (one-sided p = P(X >= b) below `significance`). The exact binomial tail is used at every
  size (no chi-square approximation): it is cheap in log space and right for small counts.
  A difference within noise therefore neither fails the gate (8 losses against 2 wins: p = 0.055)
  nor is a significant regression waved through (9 against 1: p = 0.011).
* the per-class rule: no class's F1, computed on the same shared samples for both runs, may
  drop by more than `max_class_f1_drop`. Classes with fewer shared samples than
  `min_class_support` are skipped: an F1 over two samples moves by 0.5 from one answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

Outcome = Literal["passed", "failed", "not_applicable"]
_EPS = 1e-12  # a figure exactly at its threshold passes, whatever the float rounding did


class Gates(BaseModel):
    """A template's gates; every check is off unless set."""

    model_config = ConfigDict(extra="forbid")

    min_accuracy: float | None = Field(None, ge=0, le=1, description="final accuracy at least")
    min_macro_f1: float | None = Field(None, ge=0, le=1, description="final macro F1 at least")
    max_unknown_rate: float | None = Field(
        None, ge=0, le=1, description="share of answers naming no label, at most"
    )
    no_worse_than_champion: bool = Field(
        False, description="fail when McNemar's test says the run is worse than the champion"
    )
    significance: float = Field(
        0.05, gt=0, le=0.5, description="p-value below which a regression counts as real"
    )
    max_class_f1_drop: float | None = Field(
        None, ge=0, le=1, description="largest allowed drop of one class's F1 against the champion"
    )
    min_class_support: int = Field(
        1, ge=1, le=100_000, description="shared samples a class needs to be checked"
    )

    @property
    def any(self) -> bool:
        return self.uses_champion or any(
            v is not None for v in (self.min_accuracy, self.min_macro_f1, self.max_unknown_rate)
        )

    @property
    def uses_champion(self) -> bool:
        return self.no_worse_than_champion or self.max_class_f1_drop is not None


@dataclass(frozen=True)
class EvalSummary:
    """What the gates read of one run's final evaluation."""

    accuracy: float
    macro_f1: float
    unknown_rate: float
    # Each: {"sample_id", "true_label", "predicted_label" (None: no label), "correct"}.
    predictions: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class Check:
    check: str
    outcome: Outcome
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "outcome": self.outcome, "reason": self.reason, **self.figures}


@dataclass(frozen=True)
class GateResult:
    status: Outcome
    checks: list[Check]

    @property
    def reasons(self) -> list[dict[str, Any]]:
        return [c.as_dict() for c in self.checks]

    @property
    def summary(self) -> str:
        failed = [c.reason for c in self.checks if c.outcome == "failed"]
        if failed:
            return "; ".join(failed)
        return "; ".join(c.reason for c in self.checks)


# ---- statistics ------------------------------------------------------------------------------


def binom_half_sf(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly (summed in log space, so any n works)."""
    if n < 0 or k < 0:
        raise ValueError("k and n must be non-negative")
    if k == 0:
        return 1.0
    if k > n:
        return 0.0
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k, n + 1)
    ]
    top = max(log_terms)
    total = math.fsum(math.exp(t - top) for t in log_terms)
    return min(1.0, math.exp(top + math.log(total) - n * math.log(2)))


@dataclass(frozen=True)
class McNemar:
    pairs: int  # shared samples
    losses: int  # b: champion right, new run wrong
    wins: int  # c: champion wrong, new run right
    p_worse: float  # one-sided: P(>= losses | no difference)
    p_better: float


def mcnemar(pairs: Sequence[tuple[bool, bool]]) -> McNemar:
    """Exact McNemar test on (champion correct, new run correct) pairs."""
    losses = sum(1 for champ, new in pairs if champ and not new)
    wins = sum(1 for champ, new in pairs if new and not champ)
    n = losses + wins
    return McNemar(len(pairs), losses, wins, binom_half_sf(losses, n), binom_half_sf(wins, n))


def class_f1(samples: Sequence[tuple[str, str | None]]) -> dict[str, tuple[float, int]]:
    """F1 and support of every true label among (true, predicted) pairs; an answer with no label
    (predicted None) is a miss of its true class and a false positive of none."""
    labels = sorted({t for t, _ in samples})
    out: dict[str, tuple[float, int]] = {}
    for label in labels:
        tp = sum(1 for t, p in samples if t == label and p == label)
        fp = sum(1 for t, p in samples if t != label and p == label)
        fn = sum(1 for t, p in samples if t == label and p != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = (f1, tp + fn)
    return out


def _by_sample(predictions: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str(p["sample_id"]): p for p in predictions if "sample_id" in p}


# ---- the checks --------------------------------------------------------------------------------


def _min(name: str, label: str, value: float, bound: float) -> Check:
    ok = value >= bound - _EPS
    words = "meets" if ok else "is below"
    return Check(
        name,
        "passed" if ok else "failed",
        f"{label} {value:.4f} {words} the minimum {bound:.4f}",
        {"value": value, "threshold": bound},
    )


def _max(name: str, label: str, value: float, bound: float) -> Check:
    ok = value <= bound + _EPS
    words = "is within" if ok else "exceeds"
    return Check(
        name,
        "passed" if ok else "failed",
        f"{label} {value:.4f} {words} the maximum {bound:.4f}",
        {"value": value, "threshold": bound},
    )


def _champion_checks(
    gates: Gates, run: EvalSummary, champion: EvalSummary | None, champion_id: str | None
) -> list[Check]:
    names = []
    if gates.no_worse_than_champion:
        names.append("no_worse_than_champion")
    if gates.max_class_f1_drop is not None:
        names.append("max_class_f1_drop")
    if champion is None:
        return [
            Check(n, "not_applicable", "no champion yet: nothing to compare with") for n in names
        ]
    ours, theirs = _by_sample(run.predictions), _by_sample(champion.predictions)
    shared = [sid for sid in ours if sid in theirs]
    if not shared:
        return [
            Check(
                n,
                "failed",
                f"no evaluation samples in common with champion {champion_id} (matched by "
                "sample_id): was the data set or the evaluation split changed? Promote a run "
                "by hand to start a new line of champions",
                {"champion_run_id": champion_id, "shared_samples": 0},
            )
            for n in names
        ]
    coverage = (
        ""
        if len(shared) == len(ours) == len(theirs)
        else f" ({len(shared)} of this run's {len(ours)} samples were also in the champion's "
        f"{len(theirs)})"
    )
    paired = Paired(ours, theirs, shared, champion_id, coverage)
    checks: list[Check] = []
    if gates.no_worse_than_champion:
        checks.append(_no_worse_check(gates, paired))
    if gates.max_class_f1_drop is not None:
        checks.append(_class_drop_check(gates, paired))
    return checks


Samples = dict[str, Mapping[str, Any]]  # a run's predictions by sample id


class Paired(NamedTuple):
    """This run's and the champion's predictions, and the samples both were evaluated on."""

    ours: Samples
    theirs: Samples
    shared: list[str]
    champion_id: str | None
    coverage: str  # "" when both covered the same samples, else how many were shared


def _no_worse_check(gates: Gates, p: Paired) -> Check:
    """The paired test: is this run significantly worse than the champion on shared samples?"""
    ours, theirs, shared, champion_id, coverage = p
    test = mcnemar([(bool(theirs[s]["correct"]), bool(ours[s]["correct"])) for s in shared])
    worse = test.p_worse < gates.significance
    verdict = (
        f"p = {test.p_worse:.4g} < {gates.significance:g}: significantly worse than the champion"
        if worse
        else f"p = {test.p_worse:.4g} >= {gates.significance:g}: not significantly worse"
    )
    return Check(
        "no_worse_than_champion",
        "failed" if worse else "passed",
        f"on {test.pairs} shared samples{coverage} this run got {test.losses} wrong that "
        f"champion {champion_id} got right and {test.wins} right that it got wrong; "
        f"exact McNemar {verdict}",
        {
            "champion_run_id": champion_id,
            "shared_samples": test.pairs,
            "losses": test.losses,
            "wins": test.wins,
            "p_worse": test.p_worse,
            "p_better": test.p_better,
            "significance": gates.significance,
        },
    )


def _class_drop_check(gates: Gates, p: Paired) -> Check:
    """No class with enough shared samples may lose more than `max_class_f1_drop` F1."""
    ours, theirs, shared, champion_id, coverage = p
    limit = gates.max_class_f1_drop
    assert limit is not None
    new_f1 = class_f1(
        [(str(ours[s]["true_label"]), ours[s].get("predicted_label")) for s in shared]
    )
    old_f1 = class_f1(
        [(str(theirs[s]["true_label"]), theirs[s].get("predicted_label")) for s in shared]
    )
    drops = []
    skipped = 0
    for label, (old, support) in old_f1.items():
        if support < gates.min_class_support:
            skipped += 1
            continue
        new = new_f1.get(label, (0.0, 0))[0]
        drops.append((old - new, label, old, new))
    drops.sort(key=lambda d: (-d[0], d[1]))
    over = [d for d in drops if d[0] > limit + _EPS]
    skip_note = (
        f"; {skipped} classes with fewer than {gates.min_class_support} shared samples "
        "were not checked"
        if skipped
        else ""
    )
    if over:
        worst = ", ".join(f"{lbl!r} {old:.3f} -> {new:.3f}" for _, lbl, old, new in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        reason = (
            f"{len(over)} classes lost more than {limit:.3f} F1 against champion "
            f"{champion_id}{coverage}: {worst}{more}{skip_note}"
        )
    elif drops:
        reason = (
            f"no class lost more than {limit:.3f} F1 against champion {champion_id}"
            f"{coverage} (largest drop {max(drops[0][0], 0.0):.3f}, {drops[0][1]!r})"
            f"{skip_note}"
        )
    else:
        reason = f"no class had enough shared samples to check{skip_note}"
    return Check(
        "max_class_f1_drop",
        "failed" if over else "passed",
        reason,
        {
            "champion_run_id": champion_id,
            "shared_samples": len(shared),
            "limit": limit,
            "drops": [
                {"label": lbl, "champion_f1": old, "f1": new, "drop": d}
                for d, lbl, old, new in drops[:20]
            ],
        },
    )


def evaluate(
    gates: Gates,
    run_status: str,
    run: EvalSummary | None,
    champion: EvalSummary | None = None,
    champion_id: str | None = None,
) -> GateResult:
    """The gate of a run that has ended. `passed` when no check failed (checks that cannot apply,
    such as the champion checks of a template's first run, say so and do not block it)."""
    if run_status != "succeeded":
        return GateResult(
            "not_applicable",
            [Check("run", "not_applicable", f"the run {run_status}: there is nothing to gate")],
        )
    if not gates.any:
        return GateResult(
            "not_applicable", [Check("gates", "not_applicable", "the template sets no gates")]
        )
    if run is None:
        return GateResult(
            "failed",
            [Check("final_evaluation", "failed", "the run reported no final evaluation")],
        )
    checks: list[Check] = []
    if gates.min_accuracy is not None:
        checks.append(_min("min_accuracy", "accuracy", run.accuracy, gates.min_accuracy))
    if gates.min_macro_f1 is not None:
        checks.append(_min("min_macro_f1", "macro F1", run.macro_f1, gates.min_macro_f1))
    if gates.max_unknown_rate is not None:
        checks.append(
            _max(
                "max_unknown_rate", "unknown-answer rate", run.unknown_rate, gates.max_unknown_rate
            )
        )
    if gates.uses_champion:
        checks += _champion_checks(gates, run, champion, champion_id)
    status: Outcome = "failed" if any(c.outcome == "failed" for c in checks) else "passed"
    return GateResult(status, checks)
