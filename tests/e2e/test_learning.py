"""The quickstart's promise, tested: a short training on image-only questions beats chance widely.

The synthetic answers (which quadrant / which lung) cannot be guessed from the text, so held-out
accuracy far above chance shows the model reads its image tokens.
"""

from __future__ import annotations

import pytest

from medmvl_cli.engine.quickstart import run_quickstart

pytestmark = pytest.mark.slow


def test_2d_quickstart_learns_to_read_the_image(tmp_path):
    result = run_quickstart("2d", tmp_path, n=200, overrides=("train.epochs=8",), quiet=True)
    assert result.chance == 0.25 and result.n_test == 40
    assert result.accuracy >= 0.7, result


def test_3d_quickstart_learns_to_read_the_volume(tmp_path):
    # The recipe takes the vit3d features from the default (last) layer.
    result = run_quickstart("3d", tmp_path, quiet=True)
    assert result.chance == 0.5 and result.n_test == 48
    assert result.accuracy >= 0.9, result
    # Every volume (192 train + 48 held out) was preprocessed once into the cache, not per epoch.
    assert len(list((tmp_path / "data" / "quickstart" / "cache").rglob("*.safetensors"))) == 240


@pytest.mark.parametrize("seed", range(5))
def test_3d_default_feature_layer_learns_on_every_seed(tmp_path_factory, seed):
    """The seed sweep: a random tiny 3D ViT, trained with its default feature layer, reads the
    volume on every seed (half the quickstart's epochs; the data is shared by the seeds)."""
    workdir = tmp_path_factory.getbasetemp() / "sweep-3d"
    result = run_quickstart("3d", workdir, overrides=(f"seed={seed}", "train.epochs=20"), quiet=True)
    assert result.accuracy >= 0.9, result
