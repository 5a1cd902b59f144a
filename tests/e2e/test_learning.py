"""The quickstart's promise, tested: a short training on image-only questions beats chance widely.

The synthetic answers (which quadrant / which lung) cannot be guessed from the text, so held-out
accuracy far above chance shows the model reads its image tokens.
"""

from __future__ import annotations

import pytest

from medmvl_cli.workflows.quickstart import run_quickstart

pytestmark = pytest.mark.slow


def test_2d_quickstart_learns_to_read_the_image(tmp_path):
    result = run_quickstart("2d", tmp_path, n=200, overrides=("train.epochs=8",), quiet=True)
    assert result.chance == 0.25 and result.n_test == 40
    assert result.accuracy >= 0.7, result


def test_3d_quickstart_learns_to_read_the_volume(tmp_path):
    result = run_quickstart("3d", tmp_path, quiet=True)
    assert result.chance == 0.5 and result.n_test == 48
    assert result.accuracy >= 0.9, result
    # Every volume (192 train + 48 held out) was preprocessed once into the cache, not per epoch.
    assert len(list((tmp_path / "data" / "quickstart" / "cache").rglob("*.safetensors"))) == 240
