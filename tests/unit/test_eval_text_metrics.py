"""BLEU / ROUGE / METEOR / BERTScore on hand-checked cases, and the not-computed paths."""

from __future__ import annotations

import math
import warnings

import pytest

from medmvl_cli.evaluation import text_metrics as tm

REF = "the cat is on the mat"
HYP = "the cat sat on the mat"


def test_bleu_on_a_hand_counted_pair():
    # unigrams 5/6, bigrams 3/5, trigrams 1/4, 4-grams 0/3; equal lengths so no brevity penalty.
    assert tm.bleu(HYP, REF, 1) == pytest.approx(5 / 6)
    assert tm.bleu(HYP, REF, 2) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert tm.bleu(HYP, REF, 3) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert tm.bleu(HYP, REF, 4) == 0.0  # an order without a match zeroes BLEU (no smoothing)


def test_bleu_brevity_penalty():
    assert tm.bleu("the cat", REF, 1) == pytest.approx(math.exp(1 - 6 / 2))
    assert tm.bleu("the cat", REF, 2) == pytest.approx(math.exp(1 - 6 / 2))


def bleu_tokens(text: str) -> list[str]:
    """The 13a tokens BLEU counts (sacrebleu's default tokenizer)."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text).split()


def test_bleu_keeps_case_and_splits_punctuation_13a_style():
    assert tm.bleu("Yes", "yes", 1) == 0.0
    assert bleu_tokens("A 3.5 cm nodule.") == ["A", "3.5", "cm", "nodule", "."]
    assert tm.bleu("nodule.", "nodule", 1) == pytest.approx(1 / 2)  # "." is a token of its own


def test_bleu_of_an_empty_prediction_is_zero():
    assert tm.bleu("  ", REF, 1) == 0.0


@pytest.mark.parametrize(
    "hyp,ref",
    [
        (HYP, REF),
        ("a small nodule in the right upper lobe", "small nodule in the right upper lobe of the lung"),
        ("there is a 5 mm nodule in the left lower lobe", "a 5 mm nodule is seen in the left lower lobe"),
    ],
)
def test_bleu_agrees_with_nltk_where_every_order_matches(hyp, ref):
    from nltk.translate.bleu_score import sentence_bleu

    h, r = bleu_tokens(hyp), bleu_tokens(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about zero counts at higher orders
        for n in (1, 2, 3):
            expected = sentence_bleu([r], h, weights=tuple([1 / n] * n))
            assert tm.bleu(hyp, ref, n) == pytest.approx(expected)


def test_rouge_on_a_hand_counted_pair():
    scores = tm.rouge("nodule in right lung small", "a small nodule in the right lung")
    # ROUGE-1: 5 shared words, P 5/5, R 5/7 -> F 10/12. ROUGE-L: LCS "nodule in right lung", P 4/5, R 4/7 -> F 2/3.
    assert scores["rouge_1"] == pytest.approx(10 / 12)
    assert scores["rouge_l"] == pytest.approx(2 / 3)
    assert tm.rouge("", "liver") == {"rouge_1": 0.0, "rouge_l": 0.0}


class _Lemma:
    def __init__(self, name):
        self._name = name

    def name(self):
        return self._name


class _Synset:
    def __init__(self, names):
        self._names = names

    def lemmas(self):
        return [_Lemma(n) for n in self._names]


class _TinyWordNet:
    """Stands in for NLTK's WordNet: only "lump" and "mass" are synonyms."""

    def synsets(self, word, *args, **kwargs):
        return [_Synset(["lump", "mass"])] if word in ("lump", "mass") else []


@pytest.fixture
def meteor():
    return tm.Meteor(wordnet=_TinyWordNet(), tokenize=str.split)


def test_meteor_exact_stem_and_synonym_stages(meteor):
    # 4 matches in 1 chunk: Fmean 1, penalty 0.5 * (1/4)^3.
    assert meteor("small nodule in lung", "small nodule in lung") == pytest.approx(1 - 0.5 * (1 / 4) ** 3)
    # "nodules" meets "nodule" through the Porter stem; 2 matches, 1 chunk: penalty 0.5 * (1/2)^3.
    assert meteor("small nodules", "small nodule") == pytest.approx(0.9375)
    # "lump" meets "mass" through WordNet.
    assert meteor("small lump", "small mass") == pytest.approx(0.9375)
    assert meteor("", "small mass") == 0.0


def test_meteor_fragmentation_penalty(meteor):
    # 3 matches, P 1, R 3/4: Fmean = 0.75 / (0.9 + 0.1 * 0.75); 3 chunks: penalty 0.5.
    fmean = 0.75 / (0.9 * 1 + 0.1 * 0.75)
    assert meteor("the small nodule", "the nodule is small") == pytest.approx(fmean * 0.5)


def test_meteor_reports_missing_nltk_data(monkeypatch):
    import nltk

    def missing(resource, *args, **kwargs):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", missing)
    reason = tm.meteor_unavailable_reason()
    assert "WordNet" in reason and "Punkt" in reason and "nltk.downloader" in reason


def test_bertscore_reports_a_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert "bert-score package is not installed" in tm.bertscore_unavailable_reason()


def test_bertscore_reports_a_missing_model(monkeypatch):
    import importlib.util

    import huggingface_hub

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object())
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    reason = tm.bertscore_unavailable_reason()
    assert "roberta-large" in reason and "cache" in reason
