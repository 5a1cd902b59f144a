"""Task metrics while training (generated answers scored by `medmvl eval`'s code) and the best checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from medmvl_cli.workflows.quickstart import quickstart_recipe

runner = CliRunner()


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_evaluation_scores_generated_answers(recipe_2d, synth_data):
    result = runner.invoke(app, ["finetune", str(recipe_2d), "-q", f"data.eval=[{{annotations: {synth_data}/test_2d.json}}]",
                                 "train.eval_steps=2", "train.eval_max_samples=3", "train.eval_max_new_tokens=4"])
    assert result.exit_code == 0, result.output
    run = recipe_2d.parent / "runs" / "tiny-2d"
    evals = [row for row in _rows(run) if "eval_loss" in row]
    assert len(evals) >= 2
    for row in evals:
        assert row["eval_answered"] == 3  # the cap
        assert 0.0 <= row["eval_exact_match"] <= 1.0
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "eval_exact_match"
    assert best["value"] == max(row["eval_exact_match"] for row in evals)


def test_a_metric_the_eval_records_do_not_allow_is_named(recipe_2d, synth_data):
    result = runner.invoke(app, ["finetune", str(recipe_2d), "-q", f"data.eval=[{{annotations: {synth_data}/test_2d.json}}]",
                                 "train.max_steps=1", "train.metric_for_best=choice_accuracy", "train.eval_max_samples=2"])
    assert result.exit_code == 1
    assert "train.metric_for_best is 'choice_accuracy'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("overrides, key", [
    (["train.keep_best=true"], "train.keep_best"),  # no data.eval
    (["train.keep_best=true", "data.eval=[{annotations: e.json}]"], "train.keep_best"),  # no eval_steps
    (["train.keep_best=true", "data.eval=[{annotations: e.json}]", "train.eval_steps=3", "train.save_steps=4"],
     "train.save_steps"),
    (["train.eval_generate=false", "train.metric_for_best=exact_match"], "train.metric_for_best"),
])
def test_keep_best_needs_evaluations_with_checkpoints(recipe_2d, overrides, key):
    result = runner.invoke(app, ["config", "check", str(recipe_2d), *overrides])
    assert result.exit_code == 1 and key in result.output, result.output


@pytest.mark.slow
def test_exact_match_rises_and_keep_best_makes_model_the_best_checkpoint(tmp_path):
    """The quickstart's learnable task: exact match climbs from chance, and model/ holds the weights
    of the best evaluation, whose checkpoint survives rotation."""
    from medmvl_cli.data.synth import synthesize

    data = tmp_path / "data" / "quickstart"
    synthesize(data, kind="2d", n=200, seed=0, questions="easy")
    recipe = quickstart_recipe("2d")
    result = runner.invoke(app, ["finetune", str(recipe), "-q", f"output_dir={tmp_path}/runs/best",
                                 f"data.train.0.annotations={data}/train_2d.json", f"data.train.0.image_root={data}",
                                 f"data.eval.0.annotations={data}/test_2d.json", f"data.eval.0.image_root={data}",
                                 "train.eval_generate=true", "train.eval_steps=20", "train.save_steps=20",
                                 "train.save_total_limit=1", "train.keep_best=true", "train.eval_max_new_tokens=8"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "best"
    evals = [row for row in _rows(run) if "eval_exact_match" in row]
    scores = [row["eval_exact_match"] for row in evals]
    assert scores[0] <= 0.5 and max(scores) >= 0.7, scores  # chance is 0.25
    best = json.loads((run / "best.json").read_text())
    first_best = next(row for row in evals if row["eval_exact_match"] == max(scores))
    assert (best["step"], best["value"]) == (first_best["step"], max(scores)) and best["model_is_best"]
    if best["step"] != best["final_step"]:
        checkpoint = load_file(run / "checkpoints" / f"step-{best['step']}" / "model.safetensors")
        model = load_file(run / "model" / "model.safetensors")
        shared = [key for key in model if key in checkpoint]
        assert shared and all(torch.equal(model[key], checkpoint[key]) for key in shared)
