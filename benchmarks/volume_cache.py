"""How much the preprocessed-volume cache saves per volume.

Synthesises a few realistic CT volumes (int16 HU NIfTI, 512 x 512 x ~120 voxels of
0.7 x 0.7 x 2.5 mm, stored LAS as dcm2niix writes axial CT) in a temporary folder, then times the
per-volume load of a (1, 32, 256, 256) tensor on the fly (read, reorient, window, crop, resize)
and from the cache. Prints JSON on stdout; the target is a speed-up of at least 10x.

    python benchmarks/volume_cache.py [--volumes 3] [--depth 120] [--rounds 3] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

logger = logging.getLogger("benchmarks.volume_cache")


def synth_ct(depth: int, seed: int) -> np.ndarray:
    """A chest-like phantom in HU, axes (x, y, z) = (512, 512, depth): air, body, lungs, spine."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(512) - 256, np.arange(512) - 256, indexing="ij")
    body = (x / 200.0) ** 2 + (y / 140.0) ** 2 <= 1
    lungs = (((x - 90) / 70.0) ** 2 + (y / 95.0) ** 2 <= 1) | (((x + 90) / 70.0) ** 2 + (y / 95.0) ** 2 <= 1)
    spine = ((x / 22.0) ** 2 + ((y + 110) / 22.0) ** 2) <= 1
    plane = np.full((512, 512), -1000, np.int16)
    plane[body] = 40
    plane[lungs & body] = -850
    plane[spine] = 700
    volume = np.empty((512, 512, depth), np.int16)
    for z in range(depth):
        shrink = 1.0 - 0.3 * abs(z - depth / 2) / depth  # the chest narrows towards both ends
        slice_ = np.where((x / (200.0 * shrink)) ** 2 + (y / (140.0 * shrink)) ** 2 <= 1, plane, -1000)
        volume[:, :, z] = slice_ + rng.normal(0, 15, size=(512, 512)).astype(np.int16)
    volume[:, 400:410, :] = 200  # the table
    return volume


def write_volumes(folder: Path, count: int, depth: int) -> list[Path]:
    import nibabel as nib

    affine = np.diag([-0.7, 0.7, 2.5, 1.0])  # LAS, as dcm2niix stores axial CT
    affine[:3, 3] = (179.0, -179.0, -150.0)
    paths = []
    for i in range(count):
        path = folder / f"ct_{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(synth_ct(depth + 4 * i, seed=i), affine), path)
        paths.append(path)
        logger.info("wrote %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
    return paths


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=3)
    parser.add_argument("--depth", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3, help="timed loads per volume and way (median taken)")
    parser.add_argument("--workers", type=int, default=0, help="workers for the cache fill (processes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    import torch

    from medmvl_cli.data.volume_cache import VolumeCache
    from medmvl_cli.data.volume_transforms import load_volume

    augment = SimpleNamespace(flip_prob=0.0, rotate90_prob=0.0, intensity_scale_prob=0.0, intensity_shift_prob=0.0)
    cfg = SimpleNamespace(size=(32, 256, 256), window=(-1000, 1000), spacing=None, orientation="LPS",
                          crop_foreground=True, augment=augment)
    with tempfile.TemporaryDirectory(prefix="medmvl-bench-") as tmp:
        paths = write_volumes(Path(tmp), args.volumes, args.depth)
        cache = VolumeCache(Path(tmp) / "cache")
        fill_s = timed(cache.fill, paths, cfg, args.workers)
        fly, cached, max_diff = [], [], 0.0
        for path in paths:
            fly.append(statistics.median(timed(load_volume, path, cfg) for _ in range(args.rounds)))
            cached.append(statistics.median(timed(cache.load, path, cfg) for _ in range(args.rounds)))
            max_diff = max(max_diff, float((cache.load(path, cfg) - load_volume(path, cfg)).abs().max()))
            logger.info("%s: on the fly %.3f s, cached %.4f s", path.name, fly[-1], cached[-1])
        entry_mb = statistics.mean(p.stat().st_size for p in Path(tmp, "cache").rglob("*.safetensors")) / 1e6
    result = {
        "volumes": args.volumes,
        "input_shape_xyz": [512, 512, args.depth],
        "input_spacing_mm": [0.7, 0.7, 2.5],
        "output_shape": [1, *cfg.size],
        "torch_threads": torch.get_num_threads(),
        "on_the_fly_s_per_volume": [round(s, 4) for s in fly],
        "cached_s_per_volume": [round(s, 5) for s in cached],
        "on_the_fly_s_mean": round(statistics.mean(fly), 4),
        "cached_s_mean": round(statistics.mean(cached), 5),
        "speedup": round(statistics.mean(fly) / statistics.mean(cached), 1),
        "fill_s_total": round(fill_s, 3),
        "cache_entry_mb": round(entry_mb, 2),
        "max_abs_diff_vs_on_the_fly": round(max_diff, 6),
        "target_speedup": 10,
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
