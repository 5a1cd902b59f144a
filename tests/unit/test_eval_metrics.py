"""LLaVA-Med closed / open, the strict variant, exact match and choice letters, on hand-worked cases."""

from __future__ import annotations

import pytest

from medmvl_cli.evaluation.metrics import (
    choice_correct,
    choice_correct_strict,
    choice_letter,
    chosen_letter,
    closed_hit,
    closed_hit_strict,
    exact_match,
    infer_question_type,
    open_recall,
)


@pytest.mark.parametrize(
    "prediction,reference,hit",
    [
        ("Yes.", "yes", True),
        ("No, it is not.", "no", True),
        ("yes", "no", False),
        ("Yes, a nodule.", "no", True),  # "no" is inside "nodule"
        ("There is a nodule.", "no", True),  # the pitfall: a "no" that is not a word
        ("There is a nodule.", "yes", False),
        ("The eyes are normal.", "yes", True),  # "yes" inside "eyes"
        ("left", "left", False),  # a right answer without yes/no anywhere is a miss
        ("left, not right", "left", True),  # ... and "not" supplies the "no"
    ],
)
def test_closed_hit_is_llava_meds_substring_rule(prediction, reference, hit):
    assert closed_hit(prediction, reference) is hit


@pytest.mark.parametrize(
    "prediction,reference,hit",
    [
        ("Yes.", "yes", True),
        ("No, it is not.", "no", True),
        ("There is a nodule.", "no", False),
        ("The eyes are normal.", "yes", False),
        ("yes", "no", False),
        ("no, the right lung", "right lung", True),
        ("no, the lung on the right", "right lung", False),  # words must be contiguous
        ("left, not right", "left", False),  # "not" is not "no" as a word
        ("yes", "", False),
    ],
)
def test_closed_hit_strict_needs_whole_words(prediction, reference, hit):
    assert closed_hit_strict(prediction, reference) is hit


@pytest.mark.parametrize(
    "prediction,reference,recall",
    [
        ("left lung", "left lung", 1.0),
        ("The left lung.", "left lung", 1.0),
        ("two nodules", "2 nodules", 1.0),
        ("right lung upper lobe", "right upper lobe", 1.0),  # extra words cost nothing
        ("small nodule in left lung", "small nodule in right lung", 0.8),
        ("left left left", "left lung", 0.75),  # tp counts the prediction's 3 "left"s, fn 1 "lung"
        ("lung", "left left lung", 1 / 3),  # fn counts the reference's 2 "left"s
        ("liver", "spleen", 0.0),
        ("", "spleen", 0.0),
        ("spleen", "", 0.0),
    ],
)
def test_open_recall_is_llava_meds_bag_recall(prediction, reference, recall):
    assert open_recall(prediction, reference) == pytest.approx(recall)


def test_exact_match_compares_normalised_text():
    assert exact_match("The Liver.", "liver")
    assert exact_match("Two", "2")
    assert not exact_match("liver cyst", "liver")


@pytest.mark.parametrize(
    "answer,letter",
    [
        ("(b) liver", "B"),
        ("(B) liver", "B"),
        ("B. liver", "B"),
        ("  C. right kidney", "C"),
        ("D.", "D"),
        ("b. liver", None),  # the "X." form takes a capital
        ("e.g. liver", None),
        ("Bleeding", None),
        ("B.12 deficiency", None),
    ],
)
def test_choice_letter_of_a_reference(answer, letter):
    assert choice_letter(answer) == letter


@pytest.mark.parametrize(
    "prediction,correct",
    [
        ("B. liver", True),
        ("B. spleen", True),  # the letter decides, not the text
        ("(b) liver", True),
        ("(B)", True),
        ("b", True),
        ("B)", True),
        ("The answer is B.", True),
        ("A. spleen", False),
        ("liver", False),
        ("A. spleen or B. liver", True),  # M3D-Bench credits a prediction listing several options
    ],
)
def test_choice_correct_follows_m3d_bench(prediction, correct):
    assert choice_correct(prediction, "B") is correct


@pytest.mark.parametrize(
    "prediction,letter",
    [
        ("B. liver", "B"),
        ("(c) kidney", "C"),
        ("a", "A"),
        ("The answer is (d).", "D"),
        ("A. spleen or B. liver", "A"),
        ("liver", None),
    ],
)
def test_chosen_letter_is_the_first_stated_choice(prediction, letter):
    assert chosen_letter(prediction) == letter


def test_choice_correct_strict_uses_the_first_choice_only():
    assert choice_correct_strict("B. liver", "B")
    assert choice_correct_strict("(b) liver", "b")
    assert not choice_correct_strict("A. spleen or B. liver", "B")
    assert not choice_correct_strict("liver", "B")


@pytest.mark.parametrize(
    "answer,kind",
    [("Yes.", "closed"), ("no", "closed"), ("(c) kidney", "closed"), ("B. liver", "closed"), ("kidney", "open"), ("no nodule", "open")],
)
def test_question_type_is_inferred_from_the_answer(answer, kind):
    assert infer_question_type(answer) == kind
