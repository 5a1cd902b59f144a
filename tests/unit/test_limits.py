"""Header checks of data/limits.py on real files, bombs and boundaries; turn lengths; strict
paths through symlinks; recipe YAML with keys written twice or under other trainers' names."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.data import get_testdata_file

from medmvl_cli.config.loader import KEY_ALIASES, load_recipe, read_recipe
from medmvl_cli.config.reference import key_paths
from medmvl_cli.data.annotations import Record, Turn, path_problem, resolve_media_path
from medmvl_cli.data.encoding import encode_records
from medmvl_cli.data.limits import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VOXELS,
    TooLargeError,
    check_dicom_pixels,
    checked_volume_header,
    open_image,
    overlong_turn,
    turn_char_limit,
    volume_header,
)
from medmvl_cli.errors import DataError, RecipeError
from tests import bombs

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
CT_SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def test_defaults_admit_the_largest_real_ct_and_match_pil():
    assert DEFAULT_MAX_VOXELS == 512 * 512 * 2048
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS or Image.MAX_IMAGE_PIXELS > DEFAULT_MAX_PIXELS


# ------------------------------------------------------------------------------ volume headers
def _itk(tmp_path: Path, name: str) -> Path:
    image = sitk.GetImageFromArray(np.zeros((5, 6, 7), np.int16))  # numpy (z, y, x)
    sitk.WriteImage(image, str(tmp_path / name), useCompression=True)
    return tmp_path / name


@pytest.mark.parametrize("make, shape", [
    (lambda t: NIB_DATA / "anatomical.nii", (33, 41, 25)),
    (lambda t: NIB_DATA / "example4d.nii.gz", (128, 96, 24, 2)),
    (lambda t: _itk(t, "v.nrrd"), (5, 6, 7)),
    (lambda t: _itk(t, "v.mha"), (5, 6, 7)),
    (lambda t: _itk(t, "v.mhd"), (5, 6, 7)),
    (lambda t: (np.save(t / "v.npy", np.zeros((3, 4, 5), np.float32)), t / "v.npy")[1], (3, 4, 5)),
    (lambda t: CT_SERIES, (5, 16, 16)),
])
def test_the_header_gives_the_shape_the_decoder_would(tmp_path, make, shape):
    header = volume_header(make(tmp_path))
    assert header.shape == shape and header.voxels == int(np.prod(shape))
    assert checked_volume_header(make(tmp_path), max_voxels=header.voxels) == header  # the limit is inclusive
    with pytest.raises(TooLargeError, match="over the limit") as refused:
        checked_volume_header(make(tmp_path), max_voxels=header.voxels - 1)
    assert "--max-voxels" in refused.value.hint and "data.max_voxels" in refused.value.hint


def test_a_gzip_nifti_is_refused_from_its_header_without_decompressing_the_body(tmp_path):
    """The header is one gzip member, the body a second one that is garbage: decompressing the
    body at all would fail, so refusing cleanly shows only the header was read."""
    header = gzip.decompress(bombs.nifti(tmp_path / "bomb.nii.gz", body_bytes=0).read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(header) + b"\x1f\x8b\x08\x00" + os.urandom(4096))
    with pytest.raises(TooLargeError, match=r"\(1024, 1024, 1024\), 1,073,741,824 voxels"):
        checked_volume_header(cut)
    with pytest.raises(Exception):  # noqa: B017 - whatever nibabel raises: the body is unreadable
        np.asarray(nib.load(str(cut)).dataobj[:1, :1, :1])


@pytest.mark.parametrize("build", [bombs.nrrd, bombs.mha, bombs.npy, bombs.nifti],
                         ids=["nrrd", "mha", "npy", "nifti"])
def test_bombs_of_every_format_are_refused(tmp_path, build):
    suffix = {"nrrd": ".nrrd", "mha": ".mha", "npy": ".npy", "nifti": ".nii.gz"}[build.__name__]
    path = build(tmp_path / f"bomb{suffix}")
    with pytest.raises(TooLargeError, match=str(path.name)):
        checked_volume_header(path)


def test_a_dicom_series_counts_every_file_without_reading_pixels(tmp_path):
    folder = bombs.dicom_series(tmp_path / "series", slices=3, rows=16384, columns=16384)
    (folder / "notes.txt").write_text("not DICOM")  # skipped, as the series reader skips it
    header = volume_header(folder)
    assert header.voxels == 3 * 16384 * 16384 and header.shape == (3, 16384, 16384)
    with pytest.raises(TooLargeError):
        checked_volume_header(folder)


def test_a_truncated_npy_is_named_but_a_bomb_is_refused_for_its_size_first(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((4, 6, 6), np.int16))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "v.npy").read_bytes()[:140])
    with pytest.raises(DataError, match="truncated") as cut:
        checked_volume_header(tmp_path / "cut.npy")
    assert not isinstance(cut.value, TooLargeError)
    with pytest.raises(TooLargeError):
        checked_volume_header(bombs.npy(tmp_path / "bomb.npy"))


def test_an_object_npy_is_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="Python objects"):
        volume_header(tmp_path / "o.npy")


# ---------------------------------------------------------------------------------- 2D images
def test_an_image_is_checked_from_its_size_before_decoding(tmp_path):
    path = bombs.png(tmp_path / "big.png", 10000, 10000)  # its pixel data is a few bytes: decoding would fail
    with open_image(path, max_pixels=10**8) as img:
        assert img.size == (10000, 10000)
    with pytest.raises(TooLargeError, match=r"10000 x 10000, 100,000,000 pixels") as refused:
        open_image(path, max_pixels=10**8 - 1)
    assert "--max-pixels" in refused.value.hint


def test_pils_own_bomb_error_becomes_ours_and_a_raised_limit_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    path = bombs.png(tmp_path / "bomb.png", 50000, 50000)  # over twice PIL's limit: PIL itself refuses
    with pytest.raises(TooLargeError, match="2,500,000,000 pixels"):
        open_image(path)
    with open_image(path, max_pixels=50000 * 50000) as img:  # the user raised the limit: PIL does not refuse
        assert img.size == (50000, 50000)


def test_a_dicom_image_is_checked_from_rows_and_columns():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    check_dicom_pixels("CT_small.dcm", ds, max_pixels=128 * 128)
    with pytest.raises(TooLargeError, match="CT_small.dcm: the image declares 128 x 128"):
        check_dicom_pixels("CT_small.dcm", ds, max_pixels=128 * 128 - 1)


# -------------------------------------------------------------------------------------- turns
def test_turn_limit_boundary():
    limit = turn_char_limit(64)
    assert overlong_turn(["a" * limit], 64) is None
    assert overlong_turn(["ok", "a" * (limit + 1)], 64).startswith(f"turn 1 has {limit + 1:,} characters")


class _RefusingTemplate:
    """A template that fails the test if a long text reaches it."""

    def encode(self, tokenizer, messages, placeholder_lengths, add_generation_prompt=False):
        from medmvl_cli.data.templates import Encoded

        assert all(len(m["content"]) < 1000 for m in messages), "a long turn reached the tokenizer"
        return Encoded(input_ids=[1, 2, 3], labels=[-100, 2, 3])


class _Tokenizer:
    def convert_tokens_to_ids(self, token):
        return 99


def test_training_drops_a_turn_far_beyond_max_length_before_tokenising():
    records = [Record(rid, (Turn("human", text), Turn("gpt", "A"))) for rid, text in
               (("short", "Q"), ("huge", "x" * 5_000_000))]
    kept, report = encode_records(records, _Tokenizer(), _RefusingTemplate(), {}, max_length=64)
    assert [e.record.id for e in kept] == ["short"]
    (reason, ids), = report.dropped.items()
    assert ids == ["huge"] and "1,024 characters" in reason


# ---------------------------------------------------------------------------------- symlinks
def test_strict_paths_resolve_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(b"x")
    os.symlink(root / "sub" / "a.png", root / "inner.png")  # stays inside: fine
    os.symlink(outside, root / "linked")  # a folder leading out
    os.symlink(outside / "b.png", root / "outer.png")  # dangling, and out
    assert path_problem("inner.png", root) is None and path_problem("sub/a.png", root) is None
    for written in ("linked/x.png", "outer.png"):
        kind, message = path_problem(written, root)
        assert kind == "escapes_root" and "symlink" in message
    with pytest.raises(DataError, match="symlink"):
        resolve_media_path("outer.png", root, strict=True)
    assert resolve_media_path("outer.png", root) == root / "outer.png"  # not strict: as written


# ------------------------------------------------------------------------------------ recipes
RECIPE_HEAD = "model:\n  llm: {preset: tiny-qwen2}\n  image: {encoder: {type: clip, preset: tiny}, connector: {type: mlp}}\n"


def test_a_key_written_twice_is_named_with_its_path_and_lines(write_recipe):
    path = write_recipe(RECIPE_HEAD + "data:\n  train:\n    - annotations: a.json\n      weight: 1\n"
                        "      annotations: b.json\n  num_workers: 1\n  num_workers: 2\n")
    with pytest.raises(RecipeError) as err:
        read_recipe(path)
    assert [str(p) for p in err.value.problems] == [
        "data.train.0.annotations: written twice (lines 6 and 8)",
        "data.num_workers: written twice (lines 9 and 10)",
    ]


def test_merge_keys_may_still_be_overridden(write_recipe):
    path = write_recipe(RECIPE_HEAD + "base: &base {epochs: 1, lr: 1.0e-4}\n"
                        "train:\n  <<: *base\n  lr: 2.0e-4\n")
    tree = read_recipe(path).tree
    assert tree["train"] == {"epochs": 1, "lr": 2.0e-4}


def test_an_override_with_a_duplicate_key_is_refused(write_recipe):
    with pytest.raises(RecipeError, match="written twice"):
        read_recipe(write_recipe(RECIPE_HEAD), ["train={lr: 1, lr: 2}"])


def test_every_alias_points_at_a_real_key():
    known = set(key_paths())
    assert {target for target in KEY_ALIASES.values()} <= known


@pytest.mark.parametrize("written, suggested", [
    ("train:\n  learning_rate: 1.0e-4\n", "train.lr"),
    ("num_train_epochs: 3\n", "train.epochs"),
    ("train:\n  per_device_train_batch_size: 4\n", "train.batch_size"),
    ("gradient_accumulation_steps: 4\n", "train.grad_accum"),
    ("weight_decay: 0.1\n", "train.weight_decay"),  # a real key, in the wrong section
    ("model_max_length: 512\n", "model.llm.max_length"),
])
def test_other_trainers_names_get_a_did_you_mean(write_recipe, written, suggested):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(RECIPE_HEAD + written))
    (problem,) = err.value.problems
    assert problem.message == "unknown key" and problem.hint == f"did you mean {suggested}?"
