"""Shared test setup: offline, CPU, a private preset cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runs compared with each other (resume, DDP vs one process) use the same thread count whatever the
# machine's load; the automatic choice has its own tests (tests/unit/test_threads.py).
os.environ.setdefault("MEDMVL_THREADS", str(os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
REFERENCE = REPO.parent / "shared" / "reference" / "medm-vl-annotations"


def pytest_configure(config):
    # One preset cache per test session, so tests never depend on a developer's ~/.cache.
    if "MEDMVL_CACHE" not in os.environ:
        import tempfile

        os.environ["MEDMVL_CACHE"] = tempfile.mkdtemp(prefix="medmvl-test-cache-")


@pytest.fixture
def write_recipe(tmp_path):
    """Write a YAML recipe text into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


TINY_2D = """
output_dir: runs/tiny
model:
  llm: {preset: tiny-qwen2, max_length: 256}
  image:
    encoder: {type: clip, preset: tiny}
    connector: {type: mlp}
data:
  train:
    - {annotations: data/train.json, image_root: data/images}
"""
