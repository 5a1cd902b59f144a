"""train.report_to: every HF Trainer integration by name; a missing package is a recipe problem."""

from __future__ import annotations

import pytest

from medmvl_cli.config import trackers
from medmvl_cli.config.loader import load_recipe
from medmvl_cli.errors import RecipeError
from tests.conftest import TINY_2D


def test_the_tracker_table_is_transformers_own():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert sorted(trackers.TRACKERS) == sorted(INTEGRATION_TO_CALLBACK)


def test_an_unknown_tracker_is_rejected_with_a_suggestion(write_recipe):
    with pytest.raises(RecipeError) as error:
        load_recipe(write_recipe(TINY_2D), ["train.report_to=[wandbb]"], stage="finetune")
    text = str(error.value) + " ".join(str(p) for p in error.value.problems)
    assert "train.report_to" in text and "did you mean 'wandb'" in text


def test_a_tracker_whose_package_is_missing_names_the_pip_install(write_recipe, monkeypatch):
    monkeypatch.setattr(trackers, "_importable", lambda module: module != "comet_ml")
    with pytest.raises(RecipeError) as error:
        load_recipe(write_recipe(TINY_2D), ["train.report_to=[tensorboard,comet_ml]"], stage="finetune")
    problems = {p.path: p for p in error.value.problems}
    assert set(problems) == {"train.report_to.1"}
    assert "pip install comet-ml" in problems["train.report_to.1"].hint


def test_installed_trackers_pass(write_recipe, monkeypatch):
    monkeypatch.setattr(trackers, "_importable", lambda module: True)
    recipe = load_recipe(write_recipe(TINY_2D), ["train.report_to=[tensorboard,wandb,mlflow]"], stage="finetune")
    assert recipe.train.report_to == ["tensorboard", "wandb", "mlflow"]


def test_best_metric_names_are_medmvl_evals_own():
    from typing import get_args

    from medmvl_cli.config.schema import BestMetric
    from medmvl_cli.evaluation.report import METRICS

    assert set(get_args(BestMetric)) == {"loss"} | {key for key, _ in METRICS if key != "bertscore_f1"}
