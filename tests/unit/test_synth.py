"""The synthetic dataset: deterministic, balanced, valid, and answerable only from the pixels."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmvl_cli.data import synth as synth_mod
from medmvl_cli.data.synth import EASY, QUESTIONS, synthesize
from medmvl_cli.data.validate import validate_annotations
from medmvl_cli.errors import DataError

SMALL = dict(image_size=32, volume_size=(12, 24, 24))


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, kind="both", n=48, seed=3, image_size=64, volume_size=(16, 32, 32))
    return out


# ---------------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes(tmp_path):
    synthesize(tmp_path / "a", n=10, seed=7, **SMALL)
    synthesize(tmp_path / "b", n=10, seed=7, **SMALL)
    synthesize(tmp_path / "c", n=10, seed=8, **SMALL)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert set(a) == set(c) and a != c
    media = [k for k in a if k.startswith(("images/", "volumes/"))]
    assert sum(a[k] != c[k] for k in media) > len(media) // 2


def test_layout_and_record_format(dataset):
    names = {p.name for p in dataset.iterdir()}
    assert names == {"images", "volumes", "train_2d.json", "test_2d.json", "train_3d.json", "test_3d.json",
                     "medmvl-synth.json"}
    for dim in ("2d", "3d"):
        train, test = _records(dataset / f"train_{dim}.json"), _records(dataset / f"test_{dim}.json")
        assert len(train) + len(test) == 48 and len(test) == 10
        key, token = ("image", "<image>") if dim == "2d" else ("image3d", "<image3d>")
        for rec in train:
            assert [t["from"] for t in rec["conversations"]] == ["human", "gpt"]
            assert rec["conversations"][1]["value"] == rec["answer"]
        for rec in test:
            assert [t["from"] for t in rec["conversations"]] == ["human"]
            assert rec["answer"] and rec["question_type"] in ("closed", "open")
        for rec in train + test:
            assert rec["conversations"][0]["value"].startswith(token + "\n")
            assert (dataset / rec[key][0]).is_file()
            assert rec["question_type"] == QUESTIONS[(dim, rec["task"])][1]
        assert not {r["id"] for r in train} & {r["id"] for r in test}
        assert not {r[key][0] for r in train} & {r[key][0] for r in test}


def test_a_synthetic_set_validates_clean(dataset):
    for name in ("train_2d", "test_2d", "train_3d", "test_3d"):
        report = validate_annotations(dataset / f"{name}.json")
        assert report.ok, report.to_dict()["problems"][:3]
        assert report.mode == ("train" if name.startswith("train") else "infer")


# -------------------------------------------------------------------------------------- balance
def test_question_kinds_and_answers_are_balanced(tmp_path):
    synthesize(tmp_path, kind="2d", n=100, seed=0, **SMALL)
    train = _records(tmp_path / "train_2d.json")
    tasks = Counter(r["task"] for r in train)
    assert set(tasks) == {"presence", "quadrant", "count", "report"}
    assert max(tasks.values()) - min(tasks.values()) <= 1
    for task in ("presence", "quadrant", "count"):
        answers = Counter(r["answer"] for r in train if r["task"] == task)
        assert set(answers) == set(QUESTIONS[("2d", task)][2])
        assert max(answers.values()) - min(answers.values()) <= 1, (task, answers)


def test_easy_questions_only(tmp_path):
    result = synthesize(tmp_path, kind="both", n=40, seed=1, questions="easy", **SMALL)
    assert result.questions == {"2d": (EASY["2d"],), "3d": (EASY["3d"],)}
    for dim, classes in (("2d", 4), ("3d", 2)):
        for split, count in (("train", 32), ("test", 8)):
            recs = _records(tmp_path / f"{split}_{dim}.json")
            assert {r["task"] for r in recs} == {EASY[dim]}
            answers = Counter(r["answer"] for r in recs)
            assert len(answers) == classes and set(answers.values()) == {count // classes}


def test_unknown_question_kind(tmp_path):
    with pytest.raises(DataError, match="unknown question kind"):
        synthesize(tmp_path, questions="colour", **SMALL)
    with pytest.raises(DataError, match="applies to 3d"):
        synthesize(tmp_path, kind="3d", questions="quadrant", **SMALL)


# ------------------------------------------------------------------- answers from the pixels alone
def _components(mask: np.ndarray) -> int:
    """4-connected components, by flood fill (no scipy needed)."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_2d_answers_follow_from_the_brightest_pixels(dataset):
    records = _records(dataset / "train_2d.json") + _records(dataset / "test_2d.json")
    checked = Counter()
    for rec in records:
        film = np.asarray(Image.open(dataset / rec["image"][0]))
        assert film.ndim == 2 and film.dtype == np.uint8 and film.shape == (64, 64)
        bright = film > 200
        if rec["task"] == "quadrant":
            h, w = film.shape
            # A PA film: the patient's right is on the image's left.
            quads = {"right upper": bright[: h // 2, : w // 2], "left upper": bright[: h // 2, w // 2:],
                     "right lower": bright[h // 2:, : w // 2], "left lower": bright[h // 2:, w // 2:]}
            assert max(quads, key=lambda q: quads[q].sum()) == rec["answer"]
        elif rec["task"] == "presence":
            assert ("yes" if bright.sum() > 5 else "no") == rec["answer"]
        elif rec["task"] == "count":
            assert str(_components(bright)) == rec["answer"]
        checked[rec["task"]] += 1
    assert min(checked.values()) >= 10


def test_3d_side_follows_from_the_denser_half(dataset):
    import nibabel as nib

    records = [r for r in _records(dataset / "train_3d.json") if r["task"] in ("side", "presence")]
    assert records
    for rec in records:
        img = nib.load(dataset / rec["image3d"][0])
        data = np.asarray(img.dataobj)
        assert data.dtype == np.int16 and data.shape == (32, 32, 16)  # (x, y, z)
        world_x = img.affine[0, 0] * np.arange(data.shape[0]) + img.affine[0, 3]  # RAS: x > 0 is right
        density = data.mean(axis=(1, 2))  # mean HU of each sagittal plane
        if rec["task"] == "side":
            right, left = density[world_x > 0].mean(), density[world_x < 0].mean()
            assert ("right" if right > left else "left") == rec["answer"]


def test_volumes_are_ct_in_hu_with_a_real_affine(dataset):
    import nibabel as nib

    rec = next(r for r in _records(dataset / "train_3d.json") if r["task"] == "side")
    img = nib.load(dataset / rec["image3d"][0])
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert img.header.get_xyzt_units()[0] == "mm"
    zooms = img.header.get_zooms()
    assert all(z > 1 for z in zooms) and abs(zooms[0] - 350 / 32) < 1e-3
    assert abs(img.affine[:3, :3] @ (np.array(img.shape) - 1) / 2 + img.affine[:3, 3]).max() < 1e-6  # centred
    data = np.asarray(img.dataobj).astype(float)
    assert data.min() < -950 and data.max() < 150
    values, counts = np.unique(np.round(data / 50) * 50, return_counts=True)
    assert {-1000.0, -850.0, 0.0} <= set(values[np.argsort(counts)[-3:]])  # air, lung, body dominate


def test_reports_describe_the_lesions(dataset):
    recs = [r for r in _records(dataset / "train_2d.json") if r["task"] == "report"]
    assert recs and all(r["question_type"] == "open" for r in recs)
    assert any(r["answer"].startswith("No lesion") for r in recs)
    assert any(" zone" in r["answer"] for r in recs)


# ------------------------------------------------------------------------------ writing the files
def test_refuses_to_overwrite_without_the_flag(tmp_path):
    synthesize(tmp_path, kind="2d", n=4, seed=0, **SMALL)
    before = _digest(tmp_path)
    with pytest.raises(DataError, match="--overwrite"):
        synthesize(tmp_path, kind="2d", n=4, seed=1, **SMALL)
    assert _digest(tmp_path) == before
    synthesize(tmp_path, kind="3d", n=4, seed=0, **SMALL)  # other kind: no conflict
    synthesize(tmp_path, kind="2d", n=6, seed=1, overwrite=True, **SMALL)
    assert len(list((tmp_path / "images").iterdir())) == 6  # the old images folder was replaced
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_replaces_only_what_synth_wrote(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "patient-001.png").write_bytes(b"a user's image")
    with pytest.raises(DataError, match="did not write"):
        synthesize(tmp_path, kind="2d", n=4, seed=0, overwrite=True, **SMALL)
    assert (tmp_path / "images" / "patient-001.png").read_bytes() == b"a user's image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_a_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real = synth_mod.render_film

    def failing(case, size, seed):
        calls.append(case)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(case, size, seed)

    monkeypatch.setattr(synth_mod, "render_film", failing)
    with pytest.raises(RuntimeError):
        synthesize(tmp_path / "out", kind="2d", n=8, seed=0, **SMALL)
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError):
        synthesize(tmp_path, n=1)
    with pytest.raises(DataError):
        synthesize(tmp_path, test_fraction=1.0)
    with pytest.raises(DataError):
        synthesize(tmp_path, image_size=4)
