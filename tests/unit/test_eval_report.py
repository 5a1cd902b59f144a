"""Reading predictions, counting error / unanswered rows, averaging, and the scores file."""

from __future__ import annotations

import json

import pytest

from medmvl_cli.errors import DataError
from medmvl_cli.evaluation import evaluate_predictions, scores_path_for
from medmvl_cli.evaluation import text_metrics as tm
from medmvl_cli.evaluation.predictions_file import read_predictions
from medmvl_cli.evaluation.report import score_rows

ROWS = [
    {"id": "q1", "prompt": "Nodule?", "prediction": "Yes, there is a nodule.", "answer": "yes", "question_type": "closed", "model": "m1"},
    {"id": "q2", "prompt": "Effusion?", "prediction": "There is a nodule.", "answer": "no"},
    {"id": "q3", "prompt": "Where?", "prediction": "small nodule in left lung", "answer": "small nodule in right lung", "question_type": "OPEN"},
    {"id": "q4", "prompt": "Organ?", "prediction": "B. liver", "answer": "B. liver"},
    {"id": "q5", "prompt": "Organ?", "prediction": "A. spleen", "answer": "(b) liver"},
    {"id": "q6", "prompt": "Nodule?", "error": "out of memory"},
    {"id": "q7", "prompt": "Describe.", "prediction": "a lesion"},
]


@pytest.fixture(autouse=True)
def _no_optional_metrics(monkeypatch):
    """Pin METEOR and BERTScore to 'not computed' whatever NLTK data or models this machine has."""
    monkeypatch.setattr(tm, "meteor_unavailable_reason", lambda: "no NLTK data (test)")
    monkeypatch.setattr(tm, "bertscore_unavailable_reason", lambda: "no model (test)")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_counts_and_averages(tmp_path):
    report = evaluate_predictions(write_jsonl(tmp_path / "preds.jsonl", ROWS))
    assert report.counts == {"rows": 7, "scored": 5, "errors": 1, "no_answer": 1, "closed": 4, "open": 1, "choice": 2,
                             "yes_no": 2}
    assert report.models == ["m1"]
    closed = report.metric("closed_accuracy")
    assert (closed.value, closed.n) == (1.0, 2)  # q2 is a hit: "no" inside "nodule"
    assert report.metric("closed_accuracy_strict").value == 0.5
    assert report.metric("open_recall").value == pytest.approx(0.8)
    assert (report.metric("exact_match").value, report.metric("exact_match").n) == (0.2, 5)
    assert (report.metric("choice_accuracy").value, report.metric("choice_accuracy").n) == (0.5, 2)
    assert report.metric("rouge_1").value == pytest.approx(0.8)
    meteor = report.metric("meteor")
    assert (meteor.value, meteor.n, meteor.reason) == (None, 1, "no NLTK data (test)")
    assert report.metric("bertscore_f1").reason == "no model (test)"


def test_scores_file_has_one_line_per_row(tmp_path):
    preds = write_jsonl(tmp_path / "preds.jsonl", ROWS)
    report = evaluate_predictions(preds)
    assert report.scores_file == tmp_path / "preds.scores.jsonl"
    lines = [json.loads(line) for line in report.scores_file.read_text().splitlines()]
    assert [s["id"] for s in lines] == [r["id"] for r in ROWS]
    assert [s["status"] for s in lines] == ["scored"] * 5 + ["error", "no_answer"]
    assert lines[1] == {
        "line": 2, "id": "q2", "status": "scored", "question_type": "closed", "question_type_inferred": True,
        "exact_match": False, "closed_hit": True, "closed_hit_strict": False,
    }
    assert lines[2]["open_recall"] == pytest.approx(0.8) and "bleu_4" in lines[2] and "meteor" not in lines[2]
    assert lines[4]["choice_letter"] == "B" and lines[4]["choice_correct"] is False
    assert lines[5]["error"] == "out of memory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl", "preds.scores.jsonl"]  # no temp file left


def test_scores_path_for():
    from pathlib import Path

    assert scores_path_for(Path("/r/preds.jsonl")) == Path("/r/preds.scores.jsonl")
    assert scores_path_for(Path("/r/preds.txt")) == Path("/r/preds.txt.scores.jsonl")


def test_a_given_meteor_scorer_is_used_and_averaged(tmp_path):
    rows = read_predictions(write_jsonl(tmp_path / "p.jsonl", ROWS[2:3] + [dict(ROWS[2], id="q8", prediction="x")]))
    samples, report = score_rows(rows, meteor=lambda pred, ref: 1.0 if pred == ref else 0.5)
    assert [s["meteor"] for s in samples] == [0.5, 0.5]
    assert (report.metric("meteor").value, report.metric("meteor").n, report.metric("meteor").reason) == (0.5, 2, None)


def test_metrics_without_rows_of_their_kind_are_empty_not_zero(tmp_path):
    report = evaluate_predictions(write_jsonl(tmp_path / "p.jsonl", ROWS[:1]))
    open_recall = report.metric("open_recall")
    assert (open_recall.value, open_recall.n, open_recall.reason) == (None, 0, "no open rows")
    assert report.metric("choice_accuracy").reason == "no multiple-choice rows"


def test_blank_lines_are_skipped_and_numbers_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(dict(ROWS[1], answer=2)) + "\n")
    rows = read_predictions(path)
    assert [r.line for r in rows] == [1, 3]
    assert rows[1].answer == "2"


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"id": "a", "prediction": "yes", "answer": "yes"}\n{"id": "b", "prediction": \n', "line 2: not valid JSON"),
        ('["yes"]\n', "line 1: expected a JSON object"),
        ('{"id": "a", "answer": "yes"}\n', "no `prediction`"),
        ('{"id": "a", "prediction": 3, "answer": "yes"}\n', "`prediction` must be a string"),
        ('{"id": "a", "prediction": "y", "answer": "yes", "question_type": "yes/no"}\n', "`question_type` is 'yes/no'"),
        ('{"id": "a", "prediction": "y", "answer": ["yes"]}\n', "`answer` must be a string"),
        ("\n\n", "holds no predictions"),
    ],
)
def test_bad_input_raises_data_error_naming_the_place(tmp_path, content, needle):
    path = tmp_path / "p.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        evaluate_predictions(path)
    assert needle in info.value.message
    assert str(path) in info.value.message
    assert info.value.hint
    assert not (tmp_path / "p.scores.jsonl").exists()


def test_missing_row_id_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "ct_7", "answer": "yes"}\n')
    with pytest.raises(DataError, match="'ct_7'"):
        read_predictions(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        evaluate_predictions(tmp_path / "nope.jsonl")
    assert "medmvl infer" in info.value.hint
    with pytest.raises(DataError, match="is a folder"):
        evaluate_predictions(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prediction": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_predictions(path)


def test_choice_rows_score_choice_accuracy_only(tmp_path):
    rows = [
        {"id": "c1", "prediction": "B. MRI", "answer": "B. MRI", "question_type": "choice"},
        {"id": "c2", "prediction": "The answer is A.", "answer": "C. Axial", "question_type": "CHOICE"},
        {"id": "c3", "prediction": "liver", "answer": "liver", "question_type": "choice"},  # no letter
    ]
    report = evaluate_predictions(write_jsonl(tmp_path / "preds.jsonl", rows))
    assert report.counts["closed"] == 3 and report.counts["choice"] == 3 and report.counts["open"] == 0
    assert report.metric("choice_accuracy").value == 0.5 and report.metric("choice_accuracy").n == 2
    assert report.metric("closed_accuracy").value is None  # LLaVA-Med's yes/no rule is not applied
    assert report.metric("exact_match").value == 2 / 3
