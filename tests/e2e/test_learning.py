"""The quickstart's promise, tested: a short training on image-only questions beats chance widely.

The synthetic answers (which quadrant / which lung) cannot be guessed from the text, so held-out
accuracy far above chance shows the model reads its image tokens.
"""

from __future__ import annotations

import os

import pytest

from medmvl_cli.workflows.quickstart import run_quickstart

pytestmark = pytest.mark.slow

SLICES_OVER_SIGLIP = "model.image3d.encoder={type: slices, base: siglip, preset: tiny, num_slices: 16}"


def test_2d_quickstart_learns_to_read_the_image(tmp_path):
    result = run_quickstart("2d", tmp_path, n=200, overrides=("train.epochs=8",), quiet=True)
    assert result.chance == 0.25 and result.n_test == 40
    assert result.accuracy >= 0.7, result


# The seed sweeps of issue 15 (~10 min on 2 cores) run with MEDMVL_SEED_SWEEP=1; CI runs the first
# seed of each. The vit3d sweep is not robust across machines yet: seeds 0-4 and 42 all reached 1.000
# on one 2-core machine, but on another (AMD EPYC, MKL) seed 0 stayed on the "always answer one
# side" plateau for all 40 epochs.
seed_sweep = pytest.mark.skipif(os.environ.get("MEDMVL_SEED_SWEEP") != "1",
                                reason="seed sweeps run with MEDMVL_SEED_SWEEP=1 (issue 15)")


def seeds(first: int, *sweep: int) -> list:
    return [first, *(pytest.param(seed, marks=seed_sweep) for seed in sweep)]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """One synthetic CT dataset and one volume cache, written by the first seed, read by the rest."""
    return tmp_path_factory.mktemp("sweep-3d")


# 42 is the recipe's own seed (what `medmvl quickstart --kind 3d` runs).
@pytest.mark.parametrize("seed", seeds(42, 0, 1, 2, 3))
def test_3d_quickstart_learns_to_read_the_volume(sweep_dir, seed):
    """The quickstart's CT recipe as shipped (vit3d read from its default, last, layer; packed
    batches) answers the held-out volumes."""
    result = run_quickstart("3d", sweep_dir, overrides=(f"seed={seed}",), quiet=True)
    assert result.chance == 0.5 and result.n_test == 48
    assert result.accuracy >= 0.9, result
    # Every volume (192 train + 48 held out) was preprocessed once into the cache, not per epoch.
    assert len(list((sweep_dir / "data" / "quickstart" / "cache").rglob("*.safetensors"))) == 240


@pytest.fixture(scope="module")
def slices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep-slices")


@pytest.mark.parametrize("seed", seeds(0, 1, 2, 3, 4))
def test_3d_slices_over_siglip_learns_to_read_the_volume(slices_dir, seed):
    """The same check for the `slices` encoder: tiny SigLIP over the 16 axial slices, its defaults."""
    overrides = (f"seed={seed}", SLICES_OVER_SIGLIP, "train.epochs=20")
    result = run_quickstart("3d", slices_dir, n=120, overrides=overrides, quiet=True)
    assert result.chance == 0.5 and result.n_test == 24
    assert result.accuracy >= 0.9, result
