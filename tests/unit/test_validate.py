"""`validate_annotations`: every defect found, each with its record, and nothing written."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmvl_cli.data.validate import (
    PROBLEM_KINDS,
    check_image_file,
    check_volume_file,
    validate_annotations,
)
from medmvl_cli.errors import DataError
from tests.conftest import REFERENCE


def _conv(question="<image>\nWhat is shown?", answer="A chest film."):
    turns = [{"from": "human", "value": question}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return turns


def make_media(root: Path) -> None:
    """Good and bad images and volumes under root/img and root/ct."""
    (root / "img").mkdir()
    (root / "ct").mkdir()
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(root / "img" / "good.png")
    Image.fromarray(np.full((16, 16), 50, np.uint8)).save(root / "img" / "good2.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 20, 30)]
    frames[0].save(root / "img" / "stack.tif", save_all=True, append_images=frames[1:])
    np.save(root / "img" / "volume.npy", np.zeros((4, 8, 8), np.int16))
    np.save(root / "ct" / "good.npy", np.full((4, 8, 8), -800, np.int16))
    np.save(root / "ct" / "good_float.npy", np.full((1, 4, 8, 8), -800.0, np.float32))
    np.save(root / "ct" / "flat.npy", np.zeros((8, 8), np.float32))
    nan = np.zeros((4, 8, 8), np.float32)
    nan[0, 0, :3] = np.nan
    nan[1, 1, 1] = np.inf
    np.save(root / "ct" / "nan.npy", nan)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "ct" / "slice.png")
    (root / "ct" / "truncated.npy").write_bytes(open(root / "ct" / "good.npy", "rb").read()[:140])


# (id, record, expected kind) -- every defect on its own record so each is attributed to its id.
DEFECTS = [
    ("no-conv", {"id": "no-conv", "image": ["good.png"]}, "schema"),
    ("bad-type", {"id": "bad-type", "image": 5, "conversations": _conv("What?")}, "schema"),
    ("bad-role", {"id": "bad-role", "image": ["good.png"], "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "robot", "value": "A"}]}, "role"),
    ("no-alternation", {"id": "no-alternation", "image": ["good.png"], "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A"}]}, "alternation"),
    ("empty-answer", {"id": "empty-answer", "image": ["good.png"], "conversations": _conv(answer="")}, "empty_answer"),
    ("empty-question", {"id": "empty-question", "conversations": [
        {"from": "human", "value": " "}, {"from": "gpt", "value": "A"}]}, "empty_turn"),
    ("unanswered", {"id": "unanswered", "image": ["good.png"], "conversations": _conv(answer=None)}, "unanswered"),
    ("count-mismatch", {"id": "count-mismatch", "image": ["good.png", "good2.png"], "conversations": _conv()}, "placeholder"),
    ("vol-count", {"id": "vol-count", "image3d": ["good.npy"], "conversations": _conv("No placeholder here?")}, "placeholder"),
    ("absolute", {"id": "absolute", "image": ["/abs/where/x.png"], "conversations": _conv()}, "absolute_path"),
    ("escapes", {"id": "escapes", "image": ["../img/good.png"], "conversations": _conv()}, "escapes_root"),
    ("missing", {"id": "missing", "image": ["nope.png"], "conversations": _conv()}, "missing_file"),
    ("corrupt", {"id": "corrupt", "image": ["corrupt.png"], "conversations": _conv()}, "unreadable"),
    ("truncated-vol", {"id": "truncated-vol", "image3d": ["truncated.npy"], "conversations": _conv("<image3d>\nQ")}, "unreadable"),
    ("flat-volume", {"id": "flat-volume", "image3d": ["flat.npy"], "conversations": _conv("<image3d>\nQ")}, "dimensionality"),
    ("png-volume", {"id": "png-volume", "image3d": ["slice.png"], "conversations": _conv("<image3d>\nQ")}, "dimensionality"),
    ("volume-image", {"id": "volume-image", "image": ["volume.npy"], "conversations": _conv()}, "dimensionality"),
    ("stack-image", {"id": "stack-image", "image": ["stack.tif"], "conversations": _conv()}, "dimensionality"),
    ("nan-volume", {"id": "nan-volume", "image3d": ["nan.npy"], "conversations": _conv("<image3d>\nQ")}, "nonfinite"),
    ("bad-qtype", {"id": "bad-qtype", "image": ["good.png"], "conversations": _conv(), "question_type": "maybe"}, "schema"),
    ("good", {"id": "dup", "image": ["good.png"], "conversations": _conv()}, None),
    ("dup", {"id": "dup", "image": ["good.png"], "conversations": _conv()}, "duplicate_id"),
]
CLEAN = [
    {"id": "clean-2d", "image": "good.png", "conversations": _conv()},
    {"id": "clean-3d", "image3d": ["good.npy", "good_float.npy"], "conversations": _conv("<image3d><image3d>\nCompare.")},
    {"id": "clean-text", "conversations": [{"from": "system", "value": "Be brief."}] + _conv("Hello?")},
]


@pytest.fixture
def defect_file(tmp_path):
    make_media(tmp_path)
    lines = [json.dumps(CLEAN[0])]
    lines += [json.dumps(rec) for _, rec, _ in DEFECTS]
    lines.insert(3, "{this line is not json")
    lines += [json.dumps(rec) for rec in CLEAN[1:]]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_defect_is_found_on_its_record(defect_file):
    root = defect_file.parent
    before = _sha(defect_file)
    report = validate_annotations(defect_file, root / "img", root / "ct", strict_paths=True, workers=3)
    assert _sha(defect_file) == before  # never modified
    assert report.records == len(DEFECTS) + len(CLEAN) + 1
    assert report.mode == "train" and report.format == "jsonl"
    by_id: dict[str, set[str]] = {}
    for entry in report.problems:
        by_id.setdefault(entry.id, set()).update(i.kind for i in entry.problems)
    for label, record, kind in DEFECTS:
        if kind is not None:
            # A path flagged by --strict-paths is not opened: no missing_file beside absolute_path.
            assert by_id.get(record["id"]) == {kind}, f"{label}: expected {kind}, got {by_id.get(record['id'])}"
    for rec in CLEAN:
        assert rec["id"] not in by_id, by_id.get(rec["id"])
    # The line that is not JSON is reported with its line number and no id.
    json_entries = [e for e in report.problems if any(i.kind == "json" for i in e.problems)]
    assert len(json_entries) == 1 and json_entries[0].line == 4 and json_entries[0].id is None
    kinds = set(report.totals)
    assert len(kinds) >= 12 and kinds <= set(PROBLEM_KINDS)
    assert sum(report.totals.values()) == sum(len(e.problems) for e in report.problems)
    # Exactly one extra kind per defect record: nothing else gets flagged by accident.
    dup_entry = [e for e in report.problems if e.id == "dup"]
    assert [i.kind for e in dup_entry for i in e.problems] == ["duplicate_id"]
    assert "record 22 (line 23)" in dup_entry[0].problems[0].message


def test_problems_point_at_index_and_line(defect_file):
    report = validate_annotations(defect_file, defect_file.parent / "img", defect_file.parent / "ct")
    lines = defect_file.read_text().splitlines()
    for entry in report.problems:
        if entry.id is not None:
            assert json.loads(lines[entry.line - 1])["id"] == entry.id
        assert entry.index == entry.line - 1  # no blank lines in this file


def test_without_strict_paths_absolute_and_dotdot_are_allowed(defect_file):
    root = defect_file.parent
    report = validate_annotations(defect_file, root / "img", root / "ct")
    assert "absolute_path" not in report.totals and "escapes_root" not in report.totals
    kinds = {i.kind for e in report.problems if e.id == "escapes" for i in e.problems}
    assert kinds == set()  # ../img/good.png exists
    kinds = {i.kind for e in report.problems if e.id == "absolute" for i in e.problems}
    assert kinds == {"missing_file"}


def test_to_dict_is_json_shaped(defect_file):
    report = validate_annotations(defect_file, defect_file.parent / "img", defect_file.parent / "ct")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["records"] == report.records
    assert set(data["problems"][0]) == {"id", "index", "line", "problems"}
    assert set(data["problems"][0]["problems"][0]) == {"kind", "message"}
    assert data["totals"] == report.totals


def test_workers_do_not_change_the_result(defect_file):
    root = defect_file.parent
    one = validate_annotations(defect_file, root / "img", root / "ct", workers=1).to_dict()
    many = validate_annotations(defect_file, root / "img", root / "ct", workers=6).to_dict()
    assert one == many


def test_no_files_skips_file_checks(defect_file):
    report = validate_annotations(defect_file, check_files=False)
    assert report.files_checked == 0
    assert not {"missing_file", "unreadable", "dimensionality", "nonfinite"} & set(report.totals)


def test_inference_files_may_end_on_the_human_turn(tmp_path):
    make_media(tmp_path)
    records = [{"id": f"q{i}", "image": ["img/good.png"], "conversations": _conv(answer=None), "answer": "yes",
                "question_type": "closed"} for i in range(3)]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    report = validate_annotations(path)
    assert report.ok and report.mode == "infer"
    forced = validate_annotations(path, mode="train")
    assert forced.totals == {"unanswered": 3}


def test_missing_root_is_noted(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"id": "a", "image": ["x.png"], "conversations": _conv()}]))
    report = validate_annotations(path, image_root=tmp_path / "nowhere")
    assert any("nowhere" in note for note in report.notes)
    assert report.totals == {"missing_file": 1}


def test_empty_list_is_an_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[]")
    with pytest.raises(DataError, match="no records"):
        validate_annotations(path)


@pytest.mark.parametrize("name", ["pretrain_2d", "pretrain_3d", "finetune_2d", "finetune_3d", "inference_2d", "inference_3d"])
def test_reference_files_report_only_missing_files(name):
    path = REFERENCE / f"{name}.json"
    if not path.is_file():
        pytest.skip("reference files not present")
    report = validate_annotations(path)
    assert report.totals == {"missing_file": 5}
    assert report.mode == ("infer" if name.startswith("inference") else "train")


# ------------------------------------------------------------------------------------ file checks
def test_nifti_checks(tmp_path):
    import nibabel as nib

    good = np.zeros((6, 6, 4), np.int16)
    nib.save(nib.Nifti1Image(good, np.eye(4)), tmp_path / "good.nii.gz")
    assert check_volume_file(tmp_path / "good.nii.gz") == []
    nan = np.zeros((6, 6, 4), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii")
    assert [i.kind for i in check_volume_file(tmp_path / "nan.nii")] == ["nonfinite"]
    nib.save(nib.Nifti1Image(np.zeros((6, 6), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    assert [i.kind for i in check_volume_file(tmp_path / "flat.nii.gz")] == ["dimensionality"]
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 4, 1), np.int16), np.eye(4)), tmp_path / "t1.nii.gz")
    assert check_volume_file(tmp_path / "t1.nii.gz") == []
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 4, 3), np.int16), np.eye(4)), tmp_path / "t3.nii.gz")
    assert [i.kind for i in check_volume_file(tmp_path / "t3.nii.gz")] == ["dimensionality"]
    assert [i.kind for i in check_image_file(tmp_path / "good.nii.gz")] == ["dimensionality"]


def test_itk_checks(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 6, 6), np.int16)), str(tmp_path / "v.mha"))
    assert check_volume_file(tmp_path / "v.mha") == []
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 6), np.float32)), str(tmp_path / "flat.nrrd"))
    assert [i.kind for i in check_volume_file(tmp_path / "flat.nrrd")] == ["dimensionality"]
    arr = np.zeros((4, 6, 6), np.float32)
    arr[2, 2, 2] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "inf.nrrd"))
    assert [i.kind for i in check_volume_file(tmp_path / "inf.nrrd")] == ["nonfinite"]
    (tmp_path / "junk.mha").write_text("not an image")
    assert [i.kind for i in check_volume_file(tmp_path / "junk.mha")] == ["unreadable"]


def test_dicom_checks(tmp_path):
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm"))
    assert check_image_file(ct) == []
    assert [i.kind for i in check_volume_file(ct)] == ["dimensionality"]  # one slice is not a volume
    empty = tmp_path / "series"
    empty.mkdir()
    assert [i.kind for i in check_volume_file(empty)] == ["unreadable"]
    assert [i.kind for i in check_image_file(empty)] == ["dimensionality"]


def test_full_decode_uses_the_volume_reader(tmp_path, monkeypatch):
    np.save(tmp_path / "v.npy", np.zeros((4, 6, 6), np.int16))
    calls = []

    def fake_read(path, max_voxels):
        calls.append(max_voxels)
        raise DataError(f"{path}: cannot read")

    # A stand-in module: the real reader imports MONAI, seconds of start-up for this test.
    fake = types.ModuleType("medmvl_cli.data.volume_io")
    fake.read_volume = fake_read
    monkeypatch.setitem(sys.modules, "medmvl_cli.data.volume_io", fake)
    assert check_volume_file(tmp_path / "v.npy") == []
    assert not calls
    issues = check_volume_file(tmp_path / "v.npy", full_decode=True, max_voxels=1000)
    assert [i.kind for i in issues] == ["unreadable"] and calls == [1000]  # the limit reaches the reader


# ----------------------------------------------------------------------------------------- recipe
def test_placeholder_lengths_come_from_the_model(tmp_path):
    from medmvl_cli.config.loader import load_recipe

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(RECIPE.format(max_length=64))
    from medmvl_cli.model.token_counts import placeholder_lengths_for_recipe

    # tiny CLIP: 32 px in 8 px patches = 16 patch tokens; an MLP connector keeps one token each
    assert placeholder_lengths_for_recipe(load_recipe(recipe_file)) == {"<image>": 16}


RECIPE = """
model:
  llm: {{preset: tiny-qwen2, max_length: {max_length}, template: qwen2}}
  image:
    encoder: {{type: clip, preset: tiny}}
    connector: {{type: mlp}}
data:
  train:
    - {{annotations: train.json, image_root: img}}
"""


def _write_recipe(tmp_path, max_length):
    from medmvl_cli.config.loader import load_recipe

    (tmp_path / "recipe.yaml").write_text(RECIPE.format(max_length=max_length))
    return load_recipe(tmp_path / "recipe.yaml")


@pytest.fixture
def length_data(tmp_path, monkeypatch):
    make_media(tmp_path)
    records = [
        {"id": "short", "image": ["good.png"], "conversations": _conv("<image>\nQ?", "yes")},
        {"id": "long", "image": ["good.png"], "conversations": _conv("<image>\n" + "word " * 60, "yes")},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    from medmvl_cli.model import token_counts

    monkeypatch.setattr(token_counts, "placeholder_lengths_for_recipe", lambda recipe: {"<image>": 16, "<image3d>": 32})
    return tmp_path


def test_recipe_lengths(length_data):
    tmp_path = length_data
    report = validate_annotations(tmp_path / "train.json", tmp_path / "img", recipe=_write_recipe(tmp_path, 48))
    assert report.ok  # lengths are reported, they are not record problems
    lengths = report.lengths
    assert lengths.measured == 2 and lengths.template == "qwen2" and lengths.max_length == 48
    assert 16 < lengths.percentiles["p50"] < lengths.percentiles["max"]
    assert sum(lengths.dropped.values()) == 1 and lengths.truncated == 0
    (ids,) = lengths.dropped_ids.values()
    assert ids == ["long"]
    roomy = validate_annotations(tmp_path / "train.json", tmp_path / "img", recipe=_write_recipe(tmp_path, 4096))
    assert roomy.lengths.dropped == {} and roomy.lengths.percentiles["max"] == lengths.percentiles["max"]


def test_recipe_lengths_with_answer_truncation(length_data):
    tmp_path = length_data
    records = [{"id": "long-answer", "image": ["good.png"], "conversations": _conv("<image>\nQ?", "word " * 60)}]
    (tmp_path / "answers.json").write_text(json.dumps(records))
    from medmvl_cli.config.loader import load_recipe

    (tmp_path / "recipe.yaml").write_text(RECIPE.format(max_length=48) + "  truncate_answers: true\n")
    recipe = load_recipe(tmp_path / "recipe.yaml")
    report = validate_annotations(tmp_path / "answers.json", tmp_path / "img", recipe=recipe)
    assert report.lengths.truncated == 1 and report.lengths.truncated_ids == ["long-answer"]


def test_a_file_named_twice_in_one_record_is_reported_once(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"id": "twice", "image": ["nope.png", "nope.png"],
                                 "conversations": _conv("<image><image>\nCompare.")}]))
    report = validate_annotations(path)
    assert [i.kind for i in report.problems[0].problems] == ["missing_file"] and report.files_checked == 1
