"""The preprocessed-volume cache: same tensors as on the fly, never stale, never trusting a
corrupt entry, safe to fill from several processes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors import safe_open

import medmvl_cli.data.volume_cache as volume_cache
from medmvl_cli.data.volume_cache import VolumeCache
from medmvl_cli.data.volume_transforms import load_volume
from medmvl_cli.errors import DataError


def make_cfg(size=(4, 8, 8), window=(-1000, 1000), orientation="LPS", crop_foreground=False, flip_prob=0.0):
    augment = SimpleNamespace(flip_prob=flip_prob, rotate90_prob=0.0, intensity_scale_prob=0.0,
                              intensity_shift_prob=0.0)
    return SimpleNamespace(size=size, window=window, spacing=None, orientation=orientation,
                           crop_foreground=crop_foreground, augment=augment)


def write_npy(path: Path, seed: int, shape=(6, 10, 10)) -> Path:
    hu = np.random.default_rng(seed).uniform(-1000, 1000, size=shape).astype(np.float32)
    np.save(path, hu)
    return path


def entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.safetensors"))


def forbid_preprocessing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("preprocessed again instead of reading the cache")

    monkeypatch.setattr(volume_cache, "load_volume", fail)


def test_load_matches_on_the_fly_and_hits_afterwards(tmp_path, monkeypatch):
    path = write_npy(tmp_path / "a.npy", 0)
    cfg = make_cfg()
    cache = VolumeCache(tmp_path / "cache")
    expected = load_volume(path, cfg)
    first = cache.load(path, cfg)
    assert first.dtype == torch.float32 and first.shape == (1, 4, 8, 8)
    torch.testing.assert_close(first, expected, atol=5e-4, rtol=0)  # float16 in [0, 1]
    assert not torch.equal(first, expected) or expected.eq(expected.half().float()).all()
    (entry,) = entries(tmp_path / "cache")
    with safe_open(str(entry), framework="pt") as handle:
        assert handle.get_tensor("volume").dtype == torch.float16
    forbid_preprocessing(monkeypatch)
    assert torch.equal(cache.load(path, cfg), first)  # a hit gives exactly what the miss gave
    assert torch.equal(cache.get(path, cfg), first)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_changed_file_is_never_served_stale(tmp_path):
    path = write_npy(tmp_path / "a.npy", 0)
    cfg = make_cfg()
    cache = VolumeCache(tmp_path / "cache")
    old = cache.load(path, cfg)
    write_npy(path, 1)  # same name and size, new content
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    new = cache.load(path, cfg)
    torch.testing.assert_close(new, load_volume(path, cfg), atol=5e-4, rtol=0)
    assert not torch.allclose(new, old, atol=0.05)
    assert len(entries(tmp_path / "cache")) == 2


def test_changed_parameters_get_their_own_entry(tmp_path, monkeypatch):
    path = write_npy(tmp_path / "a.npy", 0)
    cache = VolumeCache(tmp_path / "cache")
    narrow = cache.load(path, make_cfg(window=(-100, 100)))
    wide = cache.load(path, make_cfg(window=(-1000, 1000)))
    other_size = cache.load(path, make_cfg(size=(2, 4, 4)))
    assert not torch.allclose(narrow, wide, atol=0.05) and other_size.shape == (1, 2, 4, 4)
    assert len(entries(tmp_path / "cache")) == 3
    forbid_preprocessing(monkeypatch)  # augmentation settings do not change the eval tensor
    assert torch.equal(cache.load(path, make_cfg(window=(-1000, 1000), flip_prob=0.7)), wide)


@pytest.mark.parametrize("damage", ["truncate", "flip_data_byte", "empty", "foreign"])
def test_corrupt_entries_are_rebuilt(tmp_path, caplog, damage):
    path = write_npy(tmp_path / "a.npy", 0)
    other = write_npy(tmp_path / "b.npy", 5)
    cfg = make_cfg()
    cache = VolumeCache(tmp_path / "cache")
    good = cache.load(path, cfg)
    (entry,) = entries(tmp_path / "cache")
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) - 100])
    elif damage == "flip_data_byte":
        entry.write_bytes(data[:-10] + bytes([data[-10] ^ 0x40]) + data[-9:])  # inside the tensor
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # another volume's valid entry copied under this key
        cache.load(other, cfg)
        other_entry = next(e for e in entries(tmp_path / "cache") if e != entry)
        entry.write_bytes(other_entry.read_bytes())
    caplog.set_level(logging.WARNING)
    assert cache.get(path, cfg) is None
    assert torch.equal(cache.load(path, cfg), good)
    assert "rebuilding" in caplog.text
    assert torch.equal(cache.get(path, cfg), good)  # and the rebuilt entry is valid again


def test_dicom_folder_key_follows_its_files(tmp_path):
    import pydicom

    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    folder = tmp_path / "series"
    folder.mkdir()
    for f in series.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cache, cfg = VolumeCache(tmp_path / "cache"), make_cfg(size=(4, 8, 8))
    key = cache.key(folder, cfg)
    assert cache.key(folder, cfg) == key
    first = sorted(folder.iterdir())[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 1_000_000))
    touched = cache.key(folder, cfg)
    sorted(folder.iterdir())[-1].unlink()
    removed = cache.key(folder, cfg)
    assert len({key, touched, removed}) == 3
    torch.testing.assert_close(cache.load(folder, cfg), load_volume(folder, cfg), atol=5e-4, rtol=0)


def test_mhd_key_follows_its_raw_file(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(tmp_path / "v.mhd"))
    cache, cfg = VolumeCache(tmp_path / "cache"), make_cfg()
    key = cache.key(tmp_path / "v.mhd", cfg)
    raw = next(p for p in tmp_path.iterdir() if p.name.startswith("v.") and p.suffix != ".mhd")
    raw.write_bytes(raw.read_bytes()[:-2] + b"\x01\x00")
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 1_000_000))
    assert cache.key(tmp_path / "v.mhd", cfg) != key


def check_fill(tmp_path, monkeypatch, executor):
    paths = [write_npy(tmp_path / f"v{i}.npy", i) for i in range(3)]
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.float32))  # a 2-D array: fails, others go on
    cfg = make_cfg()
    cache = VolumeCache(tmp_path / "cache")
    seen = []
    report = cache.fill([*paths, paths[0], tmp_path / "flat.npy"], cfg, workers=2, executor=executor,
                        progress=lambda done, total, path: seen.append((done, total)))
    assert (report.built, report.cached, report.total) == (3, 0, 4)
    assert len(report.failed) == 1 and "flat.npy" in report.failed[0][1]
    assert seen == [(i, 4) for i in range(1, 5)]
    assert len(entries(tmp_path / "cache")) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))
    expected = [load_volume(path, cfg) for path in paths]
    forbid_preprocessing(monkeypatch)
    for path, want in zip(paths, expected):  # the workers' entries are what this process computes
        torch.testing.assert_close(cache.load(path, cfg), want, atol=5e-4, rtol=0)
    again = cache.fill(paths, cfg, workers=0)
    assert (again.built, again.cached) == (0, 3)


def test_fill_with_worker_threads(tmp_path, monkeypatch):
    check_fill(tmp_path, monkeypatch, "thread")


@pytest.mark.slow  # each worker process imports MONAI: 10-20 s on a 2-core machine
def test_fill_with_worker_processes(tmp_path, monkeypatch):
    check_fill(tmp_path, monkeypatch, "process")


def test_fill_rejects_unknown_executor(tmp_path):
    with pytest.raises(ValueError, match="executor"):
        VolumeCache(tmp_path).fill([], make_cfg(), workers=2, executor="gpu")


def test_missing_source_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="absent.nii.gz"):
        VolumeCache(tmp_path / "cache").load(tmp_path / "absent.nii.gz", make_cfg())
