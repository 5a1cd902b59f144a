"""The quickstart's promise, tested: a short training on image-only questions beats chance widely.

The synthetic answers (which quadrant / which lung) cannot be guessed from the text, so held-out
accuracy far above chance shows the model reads its image tokens.
"""

from __future__ import annotations

import os

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


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """One synthetic CT dataset and one volume cache, written by the first seed, read by the rest."""
    return tmp_path_factory.mktemp("sweep-3d")


@pytest.mark.skipif(os.environ.get("MEDMVL_SEED_SWEEP") != "1",
                    reason="the 3D default-layer seed sweep (~5-8 min) runs with MEDMVL_SEED_SWEEP=1; "
                           "not yet robust enough for CI (issue 15)")
@pytest.mark.parametrize("seed", range(5))
def test_3d_default_feature_layer_learns_on_every_seed(sweep_dir, seed):
    """The seed sweep: the quickstart's CT recipe with vit3d's default (last) feature layer, padded
    batches, answers the held-out volumes on every seed."""
    overrides = (f"seed={seed}", "model.image3d.encoder.select_layer=-1", "data.packing=false")
    result = run_quickstart("3d", sweep_dir, overrides=overrides, quiet=True)
    assert result.chance == 0.5 and result.n_test == 48
    assert result.accuracy >= 0.9, result
