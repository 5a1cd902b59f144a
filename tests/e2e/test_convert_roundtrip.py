"""A published dataset to scores: convert the PMC-VQA and VQA-RAD fixtures, validate, fine-tune a tiny
model a few steps, infer, and evaluate -- each through the real command line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from tests.unit.test_convert import materialise

runner = CliRunner()

RECIPE = """
seed: 7
output_dir: runs/bench
model:
  llm: {{preset: tiny-qwen2, max_length: 192, dtype: float32}}
  image:
    encoder: {{type: clip, preset: tiny, select_layer: -1}}
    connector: {{type: mlp}}
data:
  train:
    - {{annotations: {rad}/train.json, image_root: {rad}}}
    - {{annotations: {pmc}/train.json, image_root: {pmc}}}
  num_workers: 0
  group_by_length: false
train: {{max_steps: 3, batch_size: 2, lr: 1.0e-3, logging_steps: 1, save_steps: 1000, report_to: [none], gradient_checkpointing: false}}
"""


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_fixture_to_scores(tmp_path):
    rad, pmc = tmp_path / "vqa-rad", tmp_path / "pmc-vqa"
    _ok(["data", "convert", "vqa-rad", str(materialise("vqa-rad", tmp_path)), "--out", str(rad)])
    _ok(["data", "convert", "pmc-vqa", str(materialise("pmc-vqa", tmp_path)), "--out", str(pmc)])
    _ok(["data", "validate", str(rad / "test.json"), "--quiet"])  # not --strict-paths: the media are reached through links to the source (docs/datasets.md)

    recipe = tmp_path / "bench.yaml"
    recipe.write_text(RECIPE.format(rad=rad, pmc=pmc))
    _ok(["finetune", str(recipe), "--quiet"])
    model = tmp_path / "runs" / "bench"
    assert (model / "FINISHED").exists()

    for name, folder, split in (("rad", rad, "test"), ("pmc", pmc, "test_clean")):
        preds = tmp_path / f"{name}.jsonl"
        _ok(["infer", "--model", str(model), "--data", str(folder / f"{split}.json"), "--image-root", str(folder),
             "--out", str(preds), "--max-new-tokens", "4"])
        rows = [json.loads(line) for line in preds.read_text().splitlines()]
        expected = [r["question_type"] for r in json.loads((folder / f"{split}.json").read_text())]
        assert [r["question_type"] for r in rows] == expected  # carried from the converted records
        report = json.loads(_ok(["eval", str(preds), "--json"]))
        if name == "rad":  # VQA-RAD: LLaVA-Med's closed accuracy and open recall, one row each
            assert report["counts"]["closed"] == 1 and report["counts"]["open"] == 1
            assert report["metrics"]["closed_accuracy"]["n"] == 1 and report["metrics"]["open_recall"]["n"] == 1
        else:  # PMC-VQA: choice accuracy only
            assert report["counts"]["choice"] == 1 and report["counts"]["open"] == 0
            assert report["metrics"]["choice_accuracy"]["n"] == 1
            assert report["metrics"]["closed_accuracy"]["value"] is None


RECIPE_3D = """
seed: 7
output_dir: runs/ct
model:
  llm: {{preset: tiny-qwen2, max_length: 256, dtype: float32}}
  image3d:
    encoder: {{type: vit3d, preset: tiny, select_layer: 0}}
    connector: {{type: spatial_pooling, pool: 2}}
    volume: {{size: [16, 32, 32], crop_foreground: false}}
data:
  train:
    - {{annotations: {ct}/train.json, volume_root: {ct}}}
    - {{annotations: {ct}/train_vqa.json, volume_root: {ct}}}
  num_workers: 0
  group_by_length: false
train: {{max_steps: 2, batch_size: 2, lr: 1.0e-3, logging_steps: 1, save_steps: 1000, report_to: [none], gradient_checkpointing: false}}
"""


def test_ct_rate_fixture_to_scores(tmp_path):
    """CT-RATE's reports and CT-CHAT's multi-turn VQA (HU volumes, text-only questions) through training,
    inference with each question's conversation so far, and evaluation per question type."""
    ct = tmp_path / "ct-rate"
    _ok(["data", "convert", "ct-rate", str(materialise("ct-rate", tmp_path)), "--out", str(ct)])
    recipe = tmp_path / "ct.yaml"
    recipe.write_text(RECIPE_3D.format(ct=ct))
    _ok(["finetune", str(recipe), "--quiet"])
    model = tmp_path / "runs" / "ct"
    assert (model / "FINISHED").exists()

    preds = tmp_path / "ct.jsonl"
    _ok(["infer", "--model", str(model), "--data", str(ct / "train_vqa.json"), "--volume-root", str(ct),
         "--out", str(preds), "--max-new-tokens", "4"])
    rows = {r["id"]: r for r in map(json.loads, preds.read_text().splitlines())}
    records = json.loads((ct / "train_vqa.json").read_text())
    assert sorted(rows) == sorted(r["id"] for r in records)
    follow_up = rows["ct-rate-vqa-conversation_0-q2"]  # asked its own question, not the first one
    assert follow_up["prompt"] == "Are the main bronchi open?"
    assert follow_up["answer"] == "Yes, the trachea and both main bronchi are open."
    report = json.loads(_ok(["eval", str(preds), "--json"]))
    # closed counts the choice question too (choice questions are closed ones)
    assert (report["counts"]["closed"], report["counts"]["open"], report["counts"]["choice"]) == (2, 6, 1)
    assert report["metrics"]["choice_accuracy"]["n"] == 1
