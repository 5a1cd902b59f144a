"""`medmvl eval` through the real CLI app: table, --json, scores file, errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from medmvl_cli.evaluation import text_metrics as tm

ROWS = [
    {"id": "q1", "prompt": "Nodule?", "prediction": "Yes.", "answer": "yes", "question_type": "closed",
     "image": None, "image3d": ["ct/1.nii.gz"], "model": "runs/tiny"},
    {"id": "q2", "prompt": "Effusion?", "prediction": "No.", "answer": "yes", "question_type": "closed",
     "image": None, "image3d": ["ct/2.nii.gz"], "model": "runs/tiny"},
    {"id": "q3", "prompt": "Where?", "prediction": "the left lung", "answer": "left lung", "question_type": "open",
     "image": None, "image3d": ["ct/3.nii.gz"], "model": "runs/tiny"},
    {"id": "q4", "prompt": "Organ?", "prediction": "(b) liver", "answer": "(b) liver", "question_type": "closed",
     "image": None, "image3d": ["ct/4.nii.gz"], "model": "runs/tiny"},
    {"id": "q5", "prompt": "Nodule?", "error": "CUDA out of memory", "answer": "no", "model": "runs/tiny"},
]


@pytest.fixture(autouse=True)
def _no_optional_metrics(monkeypatch):
    monkeypatch.setattr(tm, "meteor_unavailable_reason", lambda: "NLTK data absent (test)")
    monkeypatch.setattr(tm, "bertscore_unavailable_reason", lambda: "model absent (test)")


@pytest.fixture
def preds(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def test_json_output(preds):
    result = CliRunner().invoke(app, ["eval", str(preds), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["counts"] == {"rows": 5, "scored": 4, "errors": 1, "no_answer": 0, "closed": 3, "open": 1, "choice": 1,
                             "yes_no": 2}
    assert out["metrics"]["closed_accuracy"] == {
        "label": "closed accuracy (LLaVA-Med)", "value": 0.5, "n": 2, "computed": True, "reason": None,
    }
    assert out["metrics"]["open_recall"]["value"] == 1.0
    assert out["metrics"]["choice_accuracy"]["value"] == 1.0
    assert out["metrics"]["exact_match"]["value"] == 0.75
    assert out["metrics"]["meteor"] == {"label": "METEOR", "value": None, "n": 1, "computed": False, "reason": "NLTK data absent (test)"}
    assert out["models"] == ["runs/tiny"]
    scores = preds.with_name("preds.scores.jsonl")
    assert out["scores_file"] == str(scores)
    assert [json.loads(line)["status"] for line in scores.read_text().splitlines()] == ["scored"] * 4 + ["error"]
    assert "preds.scores.jsonl" in result.stderr


def test_table_output(preds):
    result = CliRunner().invoke(app, ["eval", str(preds)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for text in ("closed accuracy (LLaVA-Med)", "open recall (LLaVA-Med)", "BLEU-4", "ROUGE-L F", "0.5000", "1 with an error"):
        assert text in result.stdout
    assert "METEOR: not computed, NLTK data absent (test)" in result.stdout
    assert preds.with_name("preds.scores.jsonl").exists()


def test_bad_line_exits_1_with_the_line_number(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"id": "q2", "prediction": "No.\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "line 2" in result.stderr and "not valid JSON" in result.stderr
    assert result.stdout == ""
    assert not path.with_name("preds.scores.jsonl").exists()


def test_missing_file_exits_1(tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "none.jsonl")], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "not found" in result.stderr


def test_help_has_an_example():
    result = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "medmvl eval" in result.stdout and "--json" in result.stdout


def test_the_table_leads_with_what_applies_and_never_scores_non_yes_no_closed_questions_zero(tmp_path):
    """Closed questions whose answers are not yes/no (which quadrant, which lung): LLaVA-Med's closed
    rule would give 0.0 for right answers, so it is listed as not applicable, below the metrics that apply."""
    rows = [{"id": f"q{i}", "prompt": "Which lung?", "prediction": answer, "answer": "left lung",
             "question_type": "closed", "model": "m"} for i, answer in enumerate(["left lung", "left lung", "right lung"])]
    preds = tmp_path / "quadrants.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = json.loads(CliRunner().invoke(app, ["eval", str(preds), "--json"]).stdout)
    closed = out["metrics"]["closed_accuracy"]
    assert closed["value"] is None and closed["n"] == 3 and "yes/no" in closed["reason"]
    assert out["counts"]["closed"] == 3 and out["counts"]["yes_no"] == 0
    table = CliRunner().invoke(app, ["eval", str(preds)], env={"COLUMNS": "160"}).stdout
    lines = [line for line in table.splitlines() if "│" in line]
    assert "exact match" in lines[0] and "0.6667" in lines[0]  # the first metric row is one that applies
    assert "closed accuracy (LLaVA-Med)" in table and "0.0000" not in table
    assert "3 closed: 0 yes/no" in table
