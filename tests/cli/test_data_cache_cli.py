"""`medmvl data cache RECIPE`: every volume of a recipe's data preprocessed once, then reused."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from medmvl_cli.config.loader import load_recipe
from medmvl_cli.data.synth import synthesize
from medmvl_cli.data.volume_cache import VolumeCache
from medmvl_cli.data.volume_transforms import load_volume

runner = CliRunner()

RECIPE = """
model:
  llm: {preset: tiny-qwen2}
  image3d:
    encoder: {type: vit3d, preset: tiny}
    connector: {type: mlp}
    volume: {size: [16, 32, 32], crop_foreground: false}
data:
  train: [{annotations: synth/train_3d.json}]
  eval: [{annotations: synth/test_3d.json}]
  cache_dir: cache
"""


def test_data_cache_fills_then_reuses(tmp_path):
    synthesize(tmp_path / "synth", kind="3d", n=5, seed=2, volume_size=(16, 32, 32), questions="easy")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    first = runner.invoke(app, ["data", "cache", str(recipe), "--workers", "0", "-q"])
    assert first.exit_code == 0, first.output
    assert "5 built, 0 already cached, 0 failed" in first.output
    second = runner.invoke(app, ["data", "cache", str(recipe), "--workers", "0", "-q"])
    assert "0 built, 5 already cached" in second.output
    resolved = load_recipe(recipe)
    volume = next((tmp_path / "synth" / "volumes").iterdir())
    cached = VolumeCache(resolved.data.cache_dir).load(volume, resolved.model.image3d.volume)
    direct = load_volume(volume, resolved.model.image3d.volume)
    assert torch.allclose(cached.float(), direct, atol=1e-3)


def test_data_cache_needs_a_cache_dir(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("  cache_dir: cache\n", ""))
    result = runner.invoke(app, ["data", "cache", str(recipe)])
    assert result.exit_code == 1 and "cache_dir" in result.output
