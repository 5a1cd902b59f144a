"""Tiny synthetic datasets and recipes for end-to-end runs (train, infer, export)."""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPE_2D = """
seed: 7
output_dir: runs/tiny-2d
model:
  llm: {{preset: tiny-qwen2, max_length: 128}}
  image:
    encoder: {{type: clip, preset: tiny, select_layer: -1}}
    connector: {{type: mlp}}
trainable: {{image_encoder: full}}
data:
  train: [{{annotations: {data}/train_2d.json}}]
  num_workers: 0
  group_by_length: false
train: {{epochs: 1, batch_size: 4, lr: 1.0e-3, logging_steps: 1, save_steps: 2, save_total_limit: 2, report_to: [none], gradient_checkpointing: false}}
"""

RECIPE_3D = """
seed: 7
output_dir: runs/tiny-3d
model:
  llm: {{preset: tiny-llama, max_length: 128}}
  image3d:
    encoder: {{type: vit3d, preset: tiny, select_layer: 0}}
    connector: {{type: spatial_pooling, pool: 2}}
    volume: {{size: [16, 32, 32], crop_foreground: false}}
data:
  train: [{{annotations: {data}/train_3d.json}}]
  num_workers: 0
train: {{epochs: 1, batch_size: 4, lr: 1.0e-3, logging_steps: 1, save_steps: 2, report_to: [none], gradient_checkpointing: false}}
"""


RECIPE_2D3D = """
seed: 7
output_dir: runs/tiny-2d3d
model:
  llm: {{preset: tiny-qwen2, max_length: 256, dtype: float32}}
  image:
    encoder: {{type: clip, preset: tiny, select_layer: -1}}
    connector: {{type: mlp}}
  image3d:
    encoder: {{type: vit3d, preset: tiny, select_layer: 0}}
    connector: {{type: spatial_pooling, pool: 2}}
    volume: {{size: [16, 32, 32], crop_foreground: false}}
data:
  train: [{{annotations: {data}/train_2d.json}}, {{annotations: {data}/train_3d.json}}]
  num_workers: 0
  group_by_length: false
train: {{max_steps: 4, batch_size: 4, lr: 3.0e-3, logging_steps: 1, save_steps: 1000, report_to: [none], gradient_checkpointing: false}}
"""


@pytest.fixture(scope="session")
def run_2d3d(tmp_path_factory, synth_data) -> Path:
    """A run with both branches (tiny CLIP + tiny 3D ViT + tiny-qwen2), trained a few steps."""
    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.engine.stages import train_stage

    root = tmp_path_factory.mktemp("run-2d3d")
    recipe = root / "tiny-2d3d.yaml"
    recipe.write_text(RECIPE_2D3D.format(data=synth_data))
    return Path(train_stage(load_recipe(recipe, []), quiet=True))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """16 films and 16 volumes with the easy questions (train 12 / test 4 each)."""
    from medmvl_cli.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, kind="both", n=16, seed=1, volume_size=(16, 32, 32), questions="easy")
    return out


@pytest.fixture
def recipe_2d(tmp_path, synth_data) -> Path:
    path = tmp_path / "tiny-2d.yaml"
    path.write_text(RECIPE_2D.format(data=synth_data))
    return path


@pytest.fixture
def recipe_3d(tmp_path, synth_data) -> Path:
    path = tmp_path / "tiny-3d.yaml"
    path.write_text(RECIPE_3D.format(data=synth_data))
    return path


def read_metrics(run: Path) -> dict[int, float]:
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}  # eval rows carry eval_* keys


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Overrides such as output_dir=runs/x resolve against the current folder: keep it private."""
    monkeypatch.chdir(tmp_path)
