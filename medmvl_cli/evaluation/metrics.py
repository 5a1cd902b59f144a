"""Per-sample answer metrics: LLaVA-Med closed / open, their strict twins, exact match, choices.

Each function scores one prediction against one reference and returns a bool or a float in
[0, 1]; averaging over rows happens in `report.py`. The n-gram metrics that need libraries (BLEU,
ROUGE, METEOR, BERTScore) live in `text_metrics.py`.
"""

from __future__ import annotations

import re
from collections import Counter

from medmvl_cli.data.answer_text import YES_NO, is_yes_no, normalize_answer

# --- LLaVA-Med, as its run_eval.py computes ---------------------------------------------------


def closed_hit(prediction: str, reference: str) -> bool:
    """LLaVA-Med's closed-question hit: substring tests on normalised text.

    The normalised prediction must contain "yes" or "no" somewhere (a substring: "no" is found in
    "nodule", "normal", "not") and must contain the normalised reference (a substring too).
    """
    pred = normalize_answer(prediction)
    ref = normalize_answer(reference)
    return ("yes" in pred or "no" in pred) and ref in pred


def closed_hit_strict(prediction: str, reference: str) -> bool:
    """`closed_hit` with whole words: "yes" or "no" must be a word of the normalised prediction
    and the normalised reference's words must appear there as a contiguous run of words."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not ref or not any(word in pred for word in YES_NO):
        return False
    width = len(ref)
    return any(pred[i : i + width] == ref for i in range(len(pred) - width + 1))


def open_recall(prediction: str, reference: str) -> float:
    """LLaVA-Med's open-question recall: a bag-of-unigrams recall, tp / (tp + fn).

    As in LLaVA-Med, both texts are normalised twice (run_eval.py normalises, then
    ``calculate_f1score`` normalises again) and ``tp`` counts the *prediction's* occurrences of
    the words it shares with the reference while ``fn`` counts the reference's occurrences of
    the words the prediction lacks: repeating a right word raises the score ("left left left"
    against "left lung" scores 3 / 4).
    """
    pred = Counter(normalize_answer(normalize_answer(prediction)).split())
    ref = Counter(normalize_answer(normalize_answer(reference)).split())
    if not pred or not ref:
        return 0.0
    tp = sum(count for word, count in pred.items() if word in ref)
    fn = sum(count for word, count in ref.items() if word not in pred)
    return tp / (tp + fn) if tp else 0.0


def exact_match(prediction: str, reference: str) -> bool:
    """The LLaVA-Med-normalised prediction equals the normalised reference.

    (Not LLaVA-Med's "exact match score", which divides shared words by prediction length.)
    """
    return normalize_answer(prediction) == normalize_answer(reference)


# --- question kind ----------------------------------------------------------------------------


def infer_question_type(answer: str) -> str:
    """``closed`` for yes/no and multiple-choice answers, else ``open``."""
    return "closed" if is_yes_no(answer) or choice_letter(answer) is not None else "open"


# --- multiple choice (M3D-Bench) --------------------------------------------------------------

# A reference written "(b) text" (either case) or "B. text" (capital letter, then a period that
# ends the text or is followed by a space: "e.g. x" is not a choice).
_REFERENCE_CHOICE = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Z])\.(?=\s|$))")
# A choice marker anywhere in a prediction, for the strict rule.
_MARKER = re.compile(r"\(([A-Za-z])\)|\b([A-Z])\.(?=\s|$)")
# A prediction that is a bare letter: "B", "b)", "B:".
_BARE_LETTER = re.compile(r"^\s*([A-Za-z])\s*[).:]?\s*$")


def choice_letter(answer: str) -> str | None:
    """The upper-case choice letter of a reference written "(b) text" or "B. text", else None."""
    match = _REFERENCE_CHOICE.match(answer)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).upper()


def choice_correct(prediction: str, letter: str) -> bool:
    """M3D-Bench's rule, widened to both answer formats: the prediction holds the letter as a
    choice marker anywhere -- "B." (M3D's exact test: the substring, case as written) or "(b)" /
    "(B)" -- or is that bare letter. Text after the letter does not count; a prediction that
    lists several options gets credit for each.
    """
    letter = letter.upper()
    if f"{letter}." in prediction or f"({letter})" in prediction or f"({letter.lower()})" in prediction:
        return True
    bare = _BARE_LETTER.match(prediction)
    return bare is not None and bare.group(1).upper() == letter


def chosen_letter(prediction: str) -> str | None:
    """The first choice the prediction states: a bare letter, else its first "(b)" / "B." marker."""
    bare = _BARE_LETTER.match(prediction)
    if bare is not None:
        return bare.group(1).upper()
    match = _MARKER.search(prediction)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).upper()


def choice_correct_strict(prediction: str, letter: str) -> bool:
    """The first choice the prediction states (`chosen_letter`) is the reference's letter."""
    return chosen_letter(prediction) == letter.upper()
