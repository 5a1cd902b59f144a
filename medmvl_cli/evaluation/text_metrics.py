"""Per-sample n-gram and model metrics, as M3D-Bench computes them (one pair at a time).

M3D-Bench scores each open answer with Hugging Face `evaluate`'s bleu / rouge / meteor /
bertscore and averages the per-sample numbers. Those wrap the libraries used here directly:

- BLEU-n: sacrebleu, 13a tokenisation (the tokenizer `evaluate`'s bleu uses), case kept, no
  smoothing, cumulative uniform weights over orders 1..n, brevity penalty. On one pair this is the
  number `evaluate`'s bleu gives with ``max_order=n``; an order with no match makes BLEU 0.
- ROUGE-1 / ROUGE-L F: Google's `rouge_score`, no stemming (what `evaluate`'s rouge runs).
- METEOR: NLTK's ``single_meteor_score`` on ``word_tokenize`` tokens (alpha 0.9, beta 3,
  gamma 0.5), which needs NLTK's WordNet and Punkt data on disk; without them it is not computed.
- BERTScore F1: the `bert-score` package with its English default (roberta-large), only when
  that package is installed and the model is in the local Hugging Face cache.

Heavy libraries are imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

BLEU_ORDERS = (1, 2, 3, 4)
BERTSCORE_MODEL = "roberta-large"


@functools.lru_cache(maxsize=1)
def _bleu_scorer():
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=max(BLEU_ORDERS), smooth_method="none", tokenize="13a", effective_order=False)


def bleu_scores(prediction: str, reference: str) -> dict[str, float]:
    """Sentence BLEU-1..4 in [0, 1] of one prediction against one reference: ``{"bleu_1": ...}``."""
    if not prediction.strip():
        return {f"bleu_{n}": 0.0 for n in BLEU_ORDERS}
    from sacrebleu.metrics import BLEU

    # One pass collects the n-gram counts of every order; each BLEU-n is then computed from them.
    # (corpus_score on one pair is the unsmoothed sentence score; sentence_score only adds a warning.)
    stats = _bleu_scorer().corpus_score([prediction], [[reference]])
    return {
        f"bleu_{n}": BLEU.compute_bleu(
            list(stats.counts[:n]), list(stats.totals[:n]), stats.sys_len, stats.ref_len,
            smooth_method="none", effective_order=False, max_ngram_order=n,
        ).score
        / 100.0
        for n in BLEU_ORDERS
    }


def bleu(prediction: str, reference: str, order: int) -> float:
    """Sentence BLEU-`order` (1..4) of one prediction against one reference."""
    return bleu_scores(prediction, reference)[f"bleu_{order}"]


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer
    from rouge_score.tokenizers import DefaultTokenizer

    # The tokenizer RougeScorer picks by default, passed explicitly so that it does not log about it.
    return RougeScorer(["rouge1", "rougeL"], tokenizer=DefaultTokenizer(use_stemmer=False))


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measures: ``{"rouge_1": f, "rouge_l": f}``."""
    if not prediction.strip():
        return {"rouge_1": 0.0, "rouge_l": 0.0}
    scores = _rouge_scorer().score(reference, prediction)
    return {"rouge_1": scores["rouge1"].fmeasure, "rouge_l": scores["rougeL"].fmeasure}


# --- METEOR -----------------------------------------------------------------------------------

_NLTK_FIX = (
    "on a machine with network run `python -m nltk.downloader wordnet punkt_tab` and copy the "
    "nltk_data folder here (or point NLTK_DATA at it)"
)


def meteor_unavailable_reason() -> str | None:
    """None when METEOR can run here, else why not (and how to fix it)."""
    try:
        import nltk
    except ImportError:
        return "the nltk package is not installed (pip install nltk)"
    missing = []
    for name, resource in (("WordNet", "corpora/wordnet"), ("Punkt", "tokenizers/punkt_tab/english/")):
        try:
            nltk.data.find(resource)
        except LookupError:
            missing.append(name)
    if missing:
        return f"NLTK's {' and '.join(missing)} data not found on this machine; {_NLTK_FIX}"
    return None


class Meteor:
    """METEOR scorer. `wordnet` and `tokenize` default to NLTK's (WordNet + ``word_tokenize``)."""

    def __init__(self, wordnet=None, tokenize: Callable[[str], list[str]] | None = None):
        if wordnet is None:
            from nltk.corpus import wordnet
        if tokenize is None:
            from nltk.tokenize import word_tokenize as tokenize
        self.wordnet = wordnet
        self.tokenize = tokenize

    def __call__(self, prediction: str, reference: str) -> float:
        from nltk.translate.meteor_score import single_meteor_score

        if not prediction.strip():
            return 0.0
        return float(
            single_meteor_score(
                self.tokenize(reference), self.tokenize(prediction), wordnet=self.wordnet, alpha=0.9, beta=3.0, gamma=0.5
            )
        )


# --- BERTScore --------------------------------------------------------------------------------


def bertscore_unavailable_reason() -> str | None:
    """None when BERTScore's package and model are both here, else why not."""
    import importlib.util

    if importlib.util.find_spec("bert_score") is None:
        return "the bert-score package is not installed"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return "huggingface_hub is not installed"
    cached = try_to_load_from_cache(BERTSCORE_MODEL, "config.json")
    if not isinstance(cached, str):
        return f"its model {BERTSCORE_MODEL} is not in the local Hugging Face cache (medmvl never downloads one)"
    return None


def bertscore_f1(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """BERTScore F1 per pair with bert-score's English default model; empty predictions score 0."""
    from bert_score import score

    keep = [i for i, p in enumerate(predictions) if p.strip()]
    out = [0.0] * len(predictions)
    if keep:
        _, _, f1 = score([predictions[i] for i in keep], [references[i] for i in keep], lang="en", verbose=False)
        for i, value in zip(keep, f1.tolist()):
            out[i] = float(value)
    return out
