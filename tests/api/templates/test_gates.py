"""The quality gates (api/templates/gates.py) against tables worked out by hand."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from api.templates.gates import EvalSummary, Gates, binom_half_sf, class_f1, evaluate, mcnemar


def exact_tail(k: int, n: int) -> Fraction:
    """P(X >= k), X ~ Binomial(n, 1/2), in exact rational arithmetic: the oracle."""
    return Fraction(sum(comb(n, i) for i in range(max(k, 0), n + 1)), 2**n)


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (0, 0, Fraction(1)),
        (1, 1, Fraction(1, 2)),
        (9, 10, Fraction(11, 1024)),  # C(10,9) + C(10,10) = 11
        (8, 10, Fraction(56, 1024)),  # 45 + 10 + 1
        (5, 10, Fraction(638, 1024)),  # 252 + 210 + 120 + 45 + 10 + 1
        (2, 10, Fraction(1013, 1024)),  # 1 - (1 + 10) / 1024
        (11, 10, Fraction(0)),
        (0, 7, Fraction(1)),
    ],
)
def test_binomial_tail_hand_computed(k: int, n: int, expected: Fraction) -> None:
    assert binom_half_sf(k, n) == pytest.approx(float(expected), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 50, 99, 300, 1001])
def test_binomial_tail_matches_exact_arithmetic(n: int) -> None:
    for k in range(0, n + 2, max(1, n // 25)):
        assert binom_half_sf(k, n) == pytest.approx(float(exact_tail(k, n)), rel=1e-9, abs=1e-300)


def test_binomial_tail_large_n_is_finite_and_tiny() -> None:
    # 50,000 discordant samples (the event contract's limit), all against the new run.
    p = binom_half_sf(30_000, 50_000)
    assert 0.0 <= p < 1e-100
    assert binom_half_sf(25_000, 50_000) == pytest.approx(0.5, abs=0.01)


def pairs_table(both: int, champ_only: int, new_only: int, neither: int) -> list[tuple[bool, bool]]:
    """(champion correct, new run correct) for a 2x2 table of counts."""
    return (
        [(True, True)] * both
        + [(True, False)] * champ_only
        + [(False, True)] * new_only
        + [(False, False)] * neither
    )


def test_mcnemar_counts_only_discordant_pairs() -> None:
    test = mcnemar(pairs_table(80, 9, 1, 10))
    assert (test.pairs, test.losses, test.wins) == (100, 9, 1)
    assert test.p_worse == pytest.approx(11 / 1024)
    assert test.p_better == pytest.approx(1023 / 1024)
    # Concordant pairs change nothing.
    assert mcnemar(pairs_table(5, 9, 1, 0)).p_worse == pytest.approx(test.p_worse)


def predictions(correct: list[bool], prefix: str = "s") -> list[dict[str, object]]:
    return [
        {
            "sample_id": f"{prefix}{i}",
            "true_label": "a",
            "predicted_label": "a" if ok else "b",
            "correct": ok,
        }
        for i, ok in enumerate(correct)
    ]


def runs_from_table(both: int, champ_only: int, new_only: int, neither: int):  # type: ignore[no-untyped-def]
    table = pairs_table(both, champ_only, new_only, neither)
    champ = predictions([c for c, _ in table])
    new = predictions([n for _, n in table])
    acc_c = sum(c for c, _ in table) / len(table)
    acc_n = sum(n for _, n in table) / len(table)
    return EvalSummary(acc_n, acc_n, 0.0, new), EvalSummary(acc_c, acc_c, 0.0, champ)


CHAMPION_ONLY = Gates(no_worse_than_champion=True)


def test_significant_regression_fails_the_gate() -> None:
    new, champ = runs_from_table(80, 9, 1, 10)  # p = 11/1024 = 0.0107
    result = evaluate(CHAMPION_ONLY, "succeeded", new, champ, "run_champ")
    assert result.status == "failed"
    check = result.checks[0]
    assert (check.figures["losses"], check.figures["wins"]) == (9, 1)
    assert "9 wrong that champion run_champ got right" in check.reason
    assert "significantly worse" in check.reason


def test_regression_within_noise_passes_the_gate() -> None:
    new, champ = runs_from_table(80, 8, 2, 10)  # p = 56/1024 = 0.0547 >= 0.05
    result = evaluate(CHAMPION_ONLY, "succeeded", new, champ, "run_champ")
    assert result.status == "passed"
    assert result.checks[0].figures["p_worse"] == pytest.approx(56 / 1024)
    assert "not significantly worse" in result.checks[0].reason
    # The same table at a laxer significance fails: the level is the template's to choose.
    lax = Gates(no_worse_than_champion=True, significance=0.06)
    assert evaluate(lax, "succeeded", new, champ, "run_champ").status == "failed"


def test_better_run_passes_and_reports_its_p_value() -> None:
    new, champ = runs_from_table(80, 1, 9, 10)
    result = evaluate(CHAMPION_ONLY, "succeeded", new, champ, "run_champ")
    assert result.status == "passed"
    assert result.checks[0].figures["p_better"] == pytest.approx(11 / 1024)


def test_pairs_are_matched_by_sample_id_not_position() -> None:
    new, champ = runs_from_table(0, 9, 1, 0)
    # Reverse one side and add samples the champion never saw: the result must not change.
    extra = predictions([False] * 50, prefix="only-new-")
    shuffled = EvalSummary(new.accuracy, new.macro_f1, 0.0, list(reversed(new.predictions)) + extra)
    result = evaluate(CHAMPION_ONLY, "succeeded", shuffled, champ, "run_champ")
    assert result.checks[0].figures["shared_samples"] == 10
    assert (result.checks[0].figures["losses"], result.checks[0].figures["wins"]) == (9, 1)
    assert "10 of this run's 60 samples" in result.checks[0].reason


def test_no_shared_samples_fails_with_a_reason() -> None:
    new = EvalSummary(0.9, 0.9, 0.0, predictions([True] * 5, prefix="x"))
    champ = EvalSummary(0.5, 0.5, 0.0, predictions([True] * 5, prefix="y"))
    result = evaluate(CHAMPION_ONLY, "succeeded", new, champ, "run_champ")
    assert result.status == "failed"
    assert "no evaluation samples in common" in result.checks[0].reason


# ---- the per-class rule ------------------------------------------------------------------------
#
#   sample   s0  s1  s2  s3  s4  s5  s6   s7
#   true     cat cat cat dog dog dog bird bird
#   champion cat cat cat dog dog dog bird bird   every class F1 = 1
#   new      cat cat dog dog dog dog bird (none)
#
#   new cat:  tp 2 fp 0 fn 1  P 1    R 2/3  F1 = 0.8      drop 0.2
#   new dog:  tp 3 fp 1 fn 0  P 3/4  R 1    F1 = 6/7      drop 1/7
#   new bird: tp 1 fp 0 fn 1  P 1    R 1/2  F1 = 2/3      drop 1/3

TRUE = ["cat", "cat", "cat", "dog", "dog", "dog", "bird", "bird"]
NEW = ["cat", "cat", "dog", "dog", "dog", "dog", "bird", None]


def labelled(predicted: list[str | None]) -> list[dict[str, object]]:
    return [
        {"sample_id": f"s{i}", "true_label": t, "predicted_label": p, "correct": t == p}
        for i, (t, p) in enumerate(zip(TRUE, predicted, strict=True))
    ]


CLASS_NEW = EvalSummary(0.75, 0.0, 0.125, labelled(NEW))
CLASS_CHAMP = EvalSummary(1.0, 1.0, 0.0, labelled(list(TRUE)))


def test_class_f1_hand_computed() -> None:
    f1 = class_f1(list(zip(TRUE, NEW, strict=True)))
    assert f1["cat"] == (pytest.approx(0.8), 3)
    assert f1["dog"] == (pytest.approx(6 / 7), 3)
    assert f1["bird"] == (pytest.approx(2 / 3), 2)


def test_class_drop_over_the_limit_fails_naming_the_class() -> None:
    result = evaluate(Gates(max_class_f1_drop=0.25), "succeeded", CLASS_NEW, CLASS_CHAMP, "run_c")
    assert result.status == "failed"
    check = result.checks[0]
    assert "1 classes lost more than 0.250 F1" in check.reason
    assert "'bird' 1.000 -> 0.667" in check.reason
    drops = {d["label"]: d["drop"] for d in check.figures["drops"]}
    assert drops == pytest.approx({"bird": 1 / 3, "cat": 0.2, "dog": 1 / 7})


def test_class_drop_exactly_at_the_limit_passes() -> None:
    result = evaluate(Gates(max_class_f1_drop=0.2), "succeeded", CLASS_NEW, CLASS_CHAMP, "run_c")
    over = result.checks[0].reason
    assert result.status == "failed"  # bird (1/3) is over 0.2 ...
    assert "'cat'" not in over  # ... but cat, which dropped exactly 0.2, is not
    passing = evaluate(Gates(max_class_f1_drop=0.34), "succeeded", CLASS_NEW, CLASS_CHAMP, "run_c")
    assert passing.status == "passed"
    assert "largest drop 0.333, 'bird'" in passing.checks[0].reason


def test_classes_below_min_support_are_skipped_and_said_so() -> None:
    gates = Gates(max_class_f1_drop=0.25, min_class_support=3)
    result = evaluate(gates, "succeeded", CLASS_NEW, CLASS_CHAMP, "run_c")
    assert result.status == "passed"  # bird has 2 shared samples: not checked
    assert "1 classes with fewer than 3 shared samples were not checked" in result.checks[0].reason


# ---- thresholds and the overall status ---------------------------------------------------------


def test_thresholds_at_their_bounds_pass_and_below_fail() -> None:
    run = EvalSummary(accuracy=0.8, macro_f1=0.7, unknown_rate=0.05)
    gates = Gates(min_accuracy=0.8, min_macro_f1=0.7, max_unknown_rate=0.05)
    assert evaluate(gates, "succeeded", run).status == "passed"
    stricter = Gates(min_accuracy=0.8, min_macro_f1=0.71, max_unknown_rate=0.04)
    result = evaluate(stricter, "succeeded", run)
    assert result.status == "failed"
    outcomes = {c.check: c.outcome for c in result.checks}
    assert outcomes == {
        "min_accuracy": "passed",
        "min_macro_f1": "failed",
        "max_unknown_rate": "failed",
    }
    assert "macro F1 0.7000 is below the minimum 0.7100" in result.summary


def test_first_run_without_champion_passes_with_champion_checks_not_applicable() -> None:
    gates = Gates(min_accuracy=0.5, no_worse_than_champion=True, max_class_f1_drop=0.1)
    result = evaluate(gates, "succeeded", EvalSummary(0.6, 0.6, 0.0))
    assert result.status == "passed"
    assert [c.outcome for c in result.checks] == ["passed", "not_applicable", "not_applicable"]
    assert "no champion yet" in result.checks[1].reason


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_run_that_did_not_succeed_is_not_gated(status: str) -> None:
    result = evaluate(Gates(min_accuracy=0.1), status, None)
    assert result.status == "not_applicable"
    assert f"the run {status}" in result.checks[0].reason


def test_no_gates_is_not_applicable_and_no_evaluation_fails() -> None:
    assert evaluate(Gates(), "succeeded", EvalSummary(0.1, 0.1, 0.9)).status == "not_applicable"
    missing = evaluate(Gates(min_accuracy=0.1), "succeeded", None)
    assert missing.status == "failed"
    assert "no final evaluation" in missing.summary


def test_gate_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="min_accuracy"):
        Gates(min_accuracy=1.5)
    with pytest.raises(ValueError, match="significance"):
        Gates(significance=0)
    with pytest.raises(ValueError, match="unknown_gate"):
        Gates.model_validate({"unknown_gate": 1})
