"""Score a predictions file: per-sample scores, averages, counts, and the scores file beside it.

Which rows a metric averages over:

- ``closed_accuracy`` / ``closed_accuracy_strict``: closed rows whose reference is not a
  multiple-choice answer (LLaVA-Med's rule makes no sense on "B. liver"; those rows go to
  ``choice_accuracy`` instead);
- ``open_recall`` and the text metrics (BLEU, ROUGE, METEOR, BERTScore): open rows;
- ``choice_accuracy`` / ``choice_accuracy_strict``: ``choice`` rows (as `medmvl data convert`
  writes for PMC-VQA and M3D-VQA), and closed rows whose reference is "(b) text" or "B. text";
- ``exact_match``: every scored row.

Rows with an ``error`` and rows without an ``answer`` are counted, never scored.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from medmvl_cli.errors import MedmvlError
from medmvl_cli.evaluation import metrics as m
from medmvl_cli.evaluation import text_metrics as tm
from medmvl_cli.evaluation.predictions_file import PredictionRow, read_predictions

log = logging.getLogger(__name__)

#: (key, label) in report order.
METRICS = (
    ("closed_accuracy", "closed accuracy (LLaVA-Med)"),
    ("closed_accuracy_strict", "closed accuracy, whole words"),
    ("open_recall", "open recall (LLaVA-Med)"),
    ("exact_match", "exact match"),
    ("choice_accuracy", "choice accuracy (M3D-Bench)"),
    ("choice_accuracy_strict", "choice accuracy, first letter"),
    *((f"bleu_{n}", f"BLEU-{n}") for n in tm.BLEU_ORDERS),
    ("rouge_1", "ROUGE-1 F"),
    ("rouge_l", "ROUGE-L F"),
    ("meteor", "METEOR"),
    ("bertscore_f1", "BERTScore F1"),
)
_TEXT_METRICS = tuple(f"bleu_{n}" for n in tm.BLEU_ORDERS) + ("rouge_1", "rouge_l")


@dataclass
class MetricResult:
    """One averaged metric. `value` is None when there was nothing to average or it was not
    computed; `reason` then says why."""

    key: str
    label: str
    value: float | None
    n: int
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"label": self.label, "value": self.value, "n": self.n, "computed": self.value is not None, "reason": self.reason}


@dataclass
class EvalReport:
    predictions: Path | None
    scores_file: Path | None
    counts: dict[str, int]
    metrics: list[MetricResult]
    models: list[str] = field(default_factory=list)

    def metric(self, key: str) -> MetricResult:
        return next(r for r in self.metrics if r.key == key)

    def to_dict(self) -> dict:
        return {
            "predictions": None if self.predictions is None else str(self.predictions),
            "scores_file": None if self.scores_file is None else str(self.scores_file),
            "models": self.models,
            "counts": self.counts,
            "metrics": {r.key: r.to_dict() for r in self.metrics},
        }


def scores_path_for(predictions: Path) -> Path:
    """``preds.jsonl`` -> ``preds.scores.jsonl`` in the same folder."""
    predictions = Path(predictions)
    stem = predictions.name[: -len(".jsonl")] if predictions.name.endswith(".jsonl") else predictions.name
    return predictions.with_name(f"{stem}.scores.jsonl")


def evaluate_predictions(predictions: Path, write_scores: bool = True) -> EvalReport:
    """Read, score and summarise a predictions JSONL; write per-sample scores beside it."""
    predictions = Path(predictions)
    rows = read_predictions(predictions)
    samples, report = score_rows(rows, source=predictions)
    if write_scores:
        report.scores_file = scores_path_for(predictions)
        write_jsonl_atomic(report.scores_file, samples)
        log.debug("wrote %d per-sample scores to %s", len(samples), report.scores_file)
    return report


def score_rows(rows: list[PredictionRow], source: Path | None = None, meteor=None,
               bertscore: bool = True) -> tuple[list[dict], EvalReport]:
    """Score `rows` (read from `source`); return the per-sample records (one per row) and the report.

    `meteor` is a callable ``(prediction, reference) -> float``; by default NLTK's METEOR when its
    data is on this machine, else METEOR is reported as not computed. `bertscore=False` skips
    BERTScore (a model of its own: too slow to run at every evaluation while training).
    """
    meteor, meteor_reason = (meteor, None) if meteor is not None else _default_meteor()
    bert_reason = tm.bertscore_unavailable_reason() if bertscore else "not computed while training"
    samples: list[dict] = []
    open_pairs: list[tuple[dict, str, str]] = []  # for BERTScore, batched at the end
    counts = {"rows": len(rows), "scored": 0, "errors": 0, "no_answer": 0, "closed": 0, "open": 0, "choice": 0,
              "yes_no": 0}
    for row in rows:
        sample = {"line": row.line, "id": row.id}
        samples.append(sample)
        if row.error is not None:
            counts["errors"] += 1
            sample.update(status="error", error=row.error)
            continue
        if row.answer is None:
            counts["no_answer"] += 1
            sample["status"] = "no_answer"
            continue
        counts["scored"] += 1
        sample.update(_score_one(row.prediction, row.answer, row.question_type, meteor))
        kind = sample["question_type"]
        counts["closed" if kind == "choice" else kind] += 1  # choice questions are closed ones
        if kind == "choice" or "choice_correct" in sample:
            counts["choice"] += 1
        if "closed_hit" in sample and m.is_yes_no(row.answer):
            counts["yes_no"] += 1
        if sample["question_type"] == "open":
            open_pairs.append((sample, row.prediction.strip(), row.answer.strip()))
    if open_pairs and bert_reason is None:
        bert_reason = _add_bertscore(open_pairs)
    report = EvalReport(
        predictions=source,
        scores_file=None,
        counts=counts,
        metrics=_aggregate(samples, counts, meteor_reason, bert_reason),
        models=sorted({row.model for row in rows if row.model}),
    )
    return samples, report


def _score_one(prediction: str, answer: str, given_type: str | None, meteor) -> dict:
    qtype = given_type or m.infer_question_type(answer)
    out = {"status": "scored", "question_type": qtype, "question_type_inferred": given_type is None}
    out["exact_match"] = m.exact_match(prediction, answer)
    letter = m.choice_letter(answer) if qtype in ("closed", "choice") else None
    if qtype == "choice" and letter is None:
        return out  # a choice reference without a letter: exact match only
    if letter is not None:
        out["choice_letter"] = letter
        out["choice_correct"] = m.choice_correct(prediction, letter)
        out["choice_correct_strict"] = m.choice_correct_strict(prediction, letter)
    elif qtype == "closed":
        out["closed_hit"] = m.closed_hit(prediction, answer)
        out["closed_hit_strict"] = m.closed_hit_strict(prediction, answer)
    else:
        pred, ref = prediction.strip(), answer.strip()  # M3D-Bench strips both
        out["open_recall"] = m.open_recall(prediction, answer)
        out.update(tm.bleu_scores(pred, ref))
        out.update(tm.rouge(pred, ref))
        if meteor is not None:
            out["meteor"] = meteor(pred, ref)
    return out


def _default_meteor():
    reason = tm.meteor_unavailable_reason()
    if reason is not None:
        return None, reason
    try:
        return tm.Meteor(), None
    except (LookupError, OSError) as err:  # data present but unreadable
        return None, f"NLTK data could not be loaded: {err}"


def _add_bertscore(open_pairs: list[tuple[dict, str, str]]) -> str | None:
    try:
        values = tm.bertscore_f1([p for _, p, _ in open_pairs], [r for _, _, r in open_pairs])
    except Exception as err:  # any failure of an optional model is reported, not raised
        log.warning("BERTScore failed: %s", err)
        return f"BERTScore failed: {type(err).__name__}: {err}"
    for (sample, _, _), value in zip(open_pairs, values):
        sample["bertscore_f1"] = value
    return None


_SAMPLE_KEY = {
    "closed_accuracy": "closed_hit",
    "closed_accuracy_strict": "closed_hit_strict",
    "choice_accuracy": "choice_correct",
    "choice_accuracy_strict": "choice_correct_strict",
}


def _aggregate(samples: list[dict], counts: dict, meteor_reason: str | None, bert_reason: str | None) -> list[MetricResult]:
    results = []
    for key, label in METRICS:
        values = [float(s[_SAMPLE_KEY.get(key, key)]) for s in samples if _SAMPLE_KEY.get(key, key) in s]
        reason = None
        if key == "meteor" and meteor_reason:
            reason, n = meteor_reason, counts["open"]
        elif key == "bertscore_f1" and bert_reason:
            reason, n = bert_reason, counts["open"]
        else:
            n = len(values)
            if not values:
                reason = _empty_reason(key)
            elif key.startswith("closed") and not counts["yes_no"]:
                # LLaVA-Med's rule credits only predictions holding "yes" / "no": over closed
                # questions none of which is yes/no it would be a 0 that means "not applicable".
                reason = "no yes/no questions among the closed ones (LLaVA-Med's rule is for yes/no)"
        value = sum(values) / len(values) if values and reason is None else None
        results.append(MetricResult(key, label, value, n, reason))
    return results


def _empty_reason(key: str) -> str:
    if key.startswith("closed"):
        return "no closed yes/no rows"
    if key.startswith("choice"):
        return "no multiple-choice rows"
    if key == "exact_match":
        return "no scored rows"
    return "no open rows"


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    """Write `records` as JSONL to a temp file beside `path`, then move it into place."""
    path = Path(path)
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as handle:
            tmp_name = handle.name
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as err:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise MedmvlError(
            f"Cannot write per-sample scores to {path}: {err.strerror or err}.",
            hint="Make that folder writable, or copy the predictions file to a writable folder and evaluate it there.",
        ) from None
