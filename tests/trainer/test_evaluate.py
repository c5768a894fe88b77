"""Label matching and metrics, checked against tables computed by hand."""

from __future__ import annotations

import pytest

from trainer.contract.events import Evaluation
from trainer.evaluate import clean_answer
from trainer.metrics import LabelMatcher, compute_metrics, normalize


def test_normalize() -> None:
    assert normalize("  English_cocker-Spaniel\n") == "english cocker spaniel"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("This is an English cocker spaniel.", "English Cocker Spaniel"),
        ("english_cocker_spaniel", "English Cocker Spaniel"),
        ("ENGLISH-COCKER-SPANIEL", "English Cocker Spaniel"),
        ("cocker spaniel", "Cocker Spaniel"),
        # The label written first is the answer, even when a longer one follows.
        ("A Cocker Spaniel, not an English Cocker Spaniel", "Cocker Spaniel"),
        ("a spaniel of some kind", None),
        ("", None),
    ],
)
def test_the_longest_label_at_the_first_match_wins(answer: str, expected: str | None) -> None:
    match = LabelMatcher(["Cocker Spaniel", "English Cocker Spaniel", "Pug"])
    assert match(answer) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("seven", "seven"),
        ("Seven<end_of_turn>", "seven"),
        ("none", None),  # "one" only as a whole word
        ("It is a 7", None),
        ("eight or nine", "eight"),  # the earlier one
        ("one or three", "one"),  # the earlier one, though shorter
        ("two or one", "two"),
    ],
)
def test_digit_names_match_as_whole_words(answer: str, expected: str | None) -> None:
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert LabelMatcher(names)(answer) == expected


def test_metrics_against_a_hand_computed_table() -> None:
    """true:  cat cat cat  dog dog bird
    pred:  cat dog  -   dog dog  -      (- = no label in the answer)

    cat:  TP 1, FP 0, FN 2 -> P 1, R 1/3, F1 0.5
    dog:  TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 0.8
    bird: TP 0, FP 0, FN 1 -> P 0, R 0, F1 0
    macro F1 over the three true classes = 1.3 / 3. Counting "no label" as a fourth class (the
    original script's fault) would give 1.3 / 4 instead."""
    labels = ["cat", "dog", "bird"]
    m = compute_metrics(
        labels,
        ["s1", "s2", "s3", "s4", "s5", "s6"],
        ["cat", "cat", "cat", "dog", "dog", "bird"],
        ["cat", "dog", None, "dog", "dog", None],
        ["cat", "a dog", "???", "Dog", "dog!", "hmm"],
    )
    assert m.accuracy == pytest.approx(0.5)
    assert m.unknown_rate == pytest.approx(2 / 6)
    assert m.macro_f1 == pytest.approx(1.3 / 3)
    assert m.macro_f1 != pytest.approx(1.3 / 4)
    per = {c.label: c for c in m.per_class}
    assert [c.label for c in m.per_class] == labels
    assert (per["cat"].precision, per["cat"].recall, per["cat"].f1) == pytest.approx(
        (1, 1 / 3, 0.5)
    )
    assert (per["dog"].precision, per["dog"].recall, per["dog"].f1) == pytest.approx(
        (2 / 3, 1, 0.8)
    )
    assert (per["bird"].precision, per["bird"].recall, per["bird"].f1) == (0, 0, 0)
    assert [c.support for c in m.per_class] == [3, 2, 1]
    # Rows: true cat, dog, bird; columns: cat, dog, bird, then "no label".
    assert m.confusion_matrix == [[1, 1, 0, 1], [0, 2, 0, 0], [0, 0, 0, 1]]
    assert m.num_samples == 6
    preds = {p.sample_id: p for p in m.predictions}
    assert preds["s3"].predicted_label is None and preds["s3"].raw_answer == "???"
    assert preds["s2"].predicted_label == "dog" and not preds["s2"].correct
    assert preds["s4"].correct and preds["s4"].true_label == "dog"
    # The event contract accepts it as is.
    Evaluation(stage="final", **m.model_dump())


def test_macro_f1_leaves_out_classes_absent_from_the_true_labels() -> None:
    """fish never occurs among the true labels: predicting it is wrong for cat, but fish's own
    F1 (0 by definition) is not averaged in: macro F1 = (cat 0 + dog 1) / 2."""
    m = compute_metrics(
        ["cat", "dog", "fish"], ["a", "b"], ["cat", "dog"], ["fish", "dog"], ["fish", "dog"]
    )
    assert m.macro_f1 == pytest.approx(0.5)
    fish = next(c for c in m.per_class if c.label == "fish")
    assert (fish.precision, fish.support) == (0, 0)
    assert m.confusion_matrix == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_all_answers_unparseable() -> None:
    m = compute_metrics(["a", "b"], ["1", "2"], ["a", "b"], [None, None], ["?", "?"])
    assert (m.accuracy, m.macro_f1, m.unknown_rate) == (0, 0, 1)
    assert m.confusion_matrix == [[0, 0, 1], [0, 0, 1]]


def test_raw_answers_are_cut_to_the_contract_size() -> None:
    m = compute_metrics(["a"], ["1"], ["a"], [None], ["x" * 5000])
    assert len(m.predictions[0].raw_answer) == 500


def test_the_label_written_first_wins_over_an_echoed_prompt() -> None:
    match = LabelMatcher(["zero", "one", "two", "three"])
    # A model that answers, then echoes the instruction's list: it answered "one".
    assert match("one. Answer with exactly one of these labels: zero, one, two, three") == "one"
    pets = LabelMatcher(["Cocker Spaniel", "English Cocker Spaniel"])
    assert pets("English Cocker Spaniel, not a Cocker Spaniel") == "English Cocker Spaniel"


def test_a_label_named_while_thinking_is_not_the_answer() -> None:
    specials = ["<|channel>", "<channel|>", "<turn|>", "<eos>"]
    raw = "<|channel>thought\nmaybe three<channel|>seven<turn|>"
    assert clean_answer(raw, specials) == "seven"
    assert LabelMatcher(["three", "seven"])(clean_answer(raw, specials)) == "seven"
    # Still thinking when the token budget ran out: no answer yet.
    assert clean_answer("<|channel>thought\nthree or", specials) == ""
    assert clean_answer("<think>two</think> one", []) == "one"
