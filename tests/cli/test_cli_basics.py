"""The command line itself: help, version, exit codes, start-up cost, config and env commands."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from typer.testing import CliRunner

from medmvl_cli import __version__
from medmvl_cli.cli.app import app
from tests.conftest import TINY_2D

runner = CliRunner()


def test_help_lists_the_command_groups():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("env", "config", "data", "pretrain", "finetune", "lora", "infer", "eval", "export",
                    "import", "demo", "quickstart"):
        assert command in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"medmvl {__version__}"


def test_unknown_command_is_a_usage_error():
    assert runner.invoke(app, ["frobnicate"]).exit_code == 2


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from medmvl_cli.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'monai', 'peft') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_config_check_ok_and_failing(write_recipe):
    good = write_recipe(TINY_2D, "good.yaml")
    result = runner.invoke(app, ["config", "check", str(good)])
    assert result.exit_code == 0, result.output
    bad = write_recipe(TINY_2D.replace("{type: mlp}", "{type: mlp, depht: 2}") + "train: {lr: -1, epochs: 0}\n", "bad.yaml")
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 1
    for key in ("model.image.connector.depht", "train.lr", "train.epochs", "did you mean 'depth'"):
        assert key in result.output


def test_config_show_prints_the_resolved_recipe(write_recipe):
    path = write_recipe(TINY_2D)
    result = runner.invoke(app, ["config", "show", str(path), "train.lr=3e-4", "--stage", "lora"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["train"]["lr"] == 3e-4
    assert shown["stage"] == "lora" and shown["trainable"]["llm"] == "lora" and shown["lora"]["r"] == 128
    assert shown["output_dir"] == str(path.parent / "runs" / "tiny")
    assert list(shown["model"]["image"]["encoder"])[0] == "type"


def test_config_show_on_a_bad_recipe_is_one_explained_error(write_recipe, tmp_path):
    result = runner.invoke(app, ["config", "show", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1
    assert "does not exist" in result.output
    result = runner.invoke(app, ["config", "show", str(write_recipe(TINY_2D)), "train.lr"])
    assert result.exit_code == 1 and "KEY=VALUE" in result.output
    result = runner.invoke(app, ["config", "show", str(write_recipe(TINY_2D)), "--stage", "warmup"])
    assert result.exit_code == 2


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "config", "show", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1
    assert result.exception is not None and type(result.exception).__name__ == "RecipeError"


def test_env_json():
    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["versions"]["torch"] and info["versions"]["transformers"]
    assert "flash-attn" in info["versions"] and "gradio" in info["versions"]
    assert info["cpu_threads"] >= 1 and isinstance(info["gpus"], list)
    assert info["bf16_fast"] is False or info["gpus"]
