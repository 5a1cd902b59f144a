"""`medmvl data convert`: each converter on a hand-written fixture in its dataset's published layout.

Fixtures live in tests/fixtures/datasets/<name>/ (text files as published); the media they list in
MEDIA are made here, tiny, so a listed-but-absent file is a "missing image" case on purpose.
Outputs are compared with hand-written files in tests/fixtures/datasets/expected/.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medmvl_cli.data.convert import CONVERTERS, ConvertOptions, convert, get_converter
from medmvl_cli.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "datasets"
EXPECTED = FIXTURES / "expected"


def _png(seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_media(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        from PIL import Image

        Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(path, "JPEG")
    elif path.suffix == ".npy":
        np.save(path, np.random.default_rng(0).random((1, 4, 8, 8), dtype=np.float32))
    elif path.name.endswith(".nii.gz"):
        import nibabel as nib

        stored = np.arange(8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4)  # X, Y, Z as CT-RATE stores it
        nib.save(nib.Nifti1Image(stored, np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))


def materialise(name: str, tmp_path: Path) -> Path:
    """Copy fixture `name` to tmp and create the media its MEDIA file lists."""
    src = tmp_path / "src" / name
    shutil.copytree(FIXTURES / name, src, ignore=shutil.ignore_patterns("MEDIA"))
    media = FIXTURES / name / "MEDIA"
    for line in (media.read_text().splitlines() if media.exists() else []):
        _write_media(src / line)
    return src


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(name: str, src: Path, out: Path, **kwargs):
    report = convert(get_converter(name), src, out, **kwargs)
    assert report.ok, report.to_dict()
    return report


def assert_matches_expected(out: Path, expected: str, splits) -> None:
    for split in splits:
        got = json.loads((out / f"{split}.json").read_text(encoding="utf-8"))
        want = json.loads((EXPECTED / expected / f"{split}.json").read_text(encoding="utf-8"))
        assert got == want, split


def counts(report) -> dict:
    return {s.split: (s.read, s.written, dict(s.dropped)) for s in report.splits}


# ------------------------------------------------------------------------------------- VQA-RAD
def test_vqa_rad_json(tmp_path):
    src = materialise("vqa-rad", tmp_path)
    before = snapshot(src)
    report = run("vqa-rad", src, tmp_path / "out")
    assert_matches_expected(tmp_path / "out", "vqa-rad", ["train", "test"])
    assert counts(report) == {
        "train": (3, 2, {"duplicate question (same media, question and answer)": 1}),
        "test": (3, 2, {"image missing": 1}),
    }
    assert snapshot(src) == before  # the source is only read


def test_rerun_gives_the_same_bytes(tmp_path):
    src = materialise("vqa-rad", tmp_path)
    out = tmp_path / "out"
    run("vqa-rad", src, out)
    first = (out / "train.json").read_bytes()
    (out / "test.json").write_text("[broken", encoding="utf-8")  # a crashed earlier run
    run("vqa-rad", src, out)
    assert (out / "train.json").read_bytes() == first
    assert json.loads((out / "test.json").read_text())[0]["id"] == "vqa-rad-3"
    assert not list(out.glob(".*.tmp"))


def _hf_parquet(folder: Path, rows_by_split: dict, names=("image", "question", "answer")) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split, rows in rows_by_split.items():
        (folder / "data").mkdir(parents=True, exist_ok=True)
        table = pa.table({
            names[0]: pa.array([{"bytes": b, "path": p} for b, p, _, _ in rows],
                               type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            names[1]: [q for _, _, q, _ in rows],
            names[2]: [a for _, _, _, a in rows],
        })
        pq.write_table(table, folder / "data" / f"{split}-00000-of-00001-0123abcd.parquet", row_group_size=2)


def test_vqa_rad_parquet_writes_each_image_once(tmp_path):
    img, other = _png(0), _png(1)
    _hf_parquet(tmp_path / "src", {
        "train": [(img, "synpic1.jpg", "Is there a fracture?", "no"), (img, "synpic1.jpg", "What is the organ?", "liver"),
                  (None, None, "Is the image missing?", "yes")],
        "test": [(other, "synpic2.jpg", "Is it normal?", "Yes")],
    })
    report = run("vqa-rad", tmp_path / "src", tmp_path / "out")
    train = json.loads((tmp_path / "out" / "train.json").read_text())
    assert [(r["id"], r["question_type"]) for r in train] == [("vqa-rad-train-0", "closed"), ("vqa-rad-train-1", "open")]
    assert train[0]["image"] == train[1]["image"]
    path = tmp_path / "out" / train[0]["image"][0]
    assert path.read_bytes() == img and path.suffix == ".png"
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 2
    assert counts(report)["train"] == (3, 2, {"image missing": 1})


# ---------------------------------------------------------------------------------------- SLAKE
def test_slake_english_by_default(tmp_path):
    src = materialise("slake", tmp_path)
    report = run("slake", src / "Slake1.0", tmp_path / "out")
    assert_matches_expected(tmp_path / "out", "slake", ["train", "validation", "test"])
    read, written, dropped = counts(report)["train"]
    assert (read, written) == (4, 2)
    assert dropped == {"q_lang zh (not --lang en)": 1, "image missing": 1}
    assert counts(report)["test"][2] == {"duplicate question (same media, question and answer)": 1,
                                         "q_lang zh (not --lang en)": 1}


def test_slake_all_languages(tmp_path):
    src = materialise("slake", tmp_path)
    run("slake", src, tmp_path / "out", splits=["test"], options=ConvertOptions(lang="all"))
    assert_matches_expected(tmp_path / "out", "slake-all", ["test"])
    assert not (tmp_path / "out" / "train.json").exists()
    run("slake", src, tmp_path / "out", splits=["validation"])
    summary = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert sorted(summary["splits"]) == ["test", "validation"]  # a later run keeps the earlier split's counts


# -------------------------------------------------------------------------------------- PathVQA
def test_pathvqa_parquet(tmp_path):
    _hf_parquet(tmp_path / "src", {"validation": [(_png(2), "val_0001.jpg", "Is this a tumor?", "yes"),
                                                  (_png(3), "val_0002.jpg", "What stain is used?", "hematoxylin and eosin")]})
    run("pathvqa", tmp_path / "src", tmp_path / "out")
    records = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert [r["question_type"] for r in records] == ["closed", "open"]
    assert records[1]["conversations"][0]["value"] == "<image>\nWhat stain is used?"


def test_pathvqa_refuses_the_pickled_release(tmp_path):
    src = materialise("pathvqa-pickle", tmp_path)
    with pytest.raises(DataError, match="pickled release") as err:
        convert(get_converter("pathvqa"), src, tmp_path / "out")
    assert "flaviagiammarino/path-vqa" in err.value.hint
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------- PMC-VQA
def test_pmc_vqa_choices(tmp_path):
    src = materialise("pmc-vqa", tmp_path)
    report = run("pmc-vqa", src, tmp_path / "out")
    assert [s.split for s in report.splits] == ["train", "test_clean"]
    assert_matches_expected(tmp_path / "out", "pmc-vqa", ["train", "test_clean"])
    assert counts(report)["train"] == (4, 2, {"image missing": 1, "Answer_label not one of A-D with a choice text": 1})


# ------------------------------------------------------------------------------------ generic HF
def test_hf_generic_columns_and_arrow_folder(tmp_path):
    import pyarrow as pa

    folder = tmp_path / "src" / "test"
    folder.mkdir(parents=True)
    table = pa.table({"img": [{"bytes": _png(4), "path": None}], "q": ["Describe the finding."],
                      "a": ["A small effusion."], "kind": ["OPEN"]})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    options = ConvertOptions(image_column="img", question_column="q", answer_column="a", question_type_column="kind")
    run("hf", tmp_path / "src", tmp_path / "out", options=options)
    [record] = json.loads((tmp_path / "out" / "test.json").read_text())
    assert record["id"] == "hf-test-0" and record["question_type"] == "open" and record["answer"] == "A small effusion."


def test_hf_missing_column_is_named(tmp_path):
    _hf_parquet(tmp_path / "src", {"train": [(_png(), "x.png", "q?", "yes")]})
    with pytest.raises(DataError, match="caption"):
        convert(get_converter("hf"), tmp_path / "src", tmp_path / "out", options=ConvertOptions(answer_column="caption"))


# ------------------------------------------------------------------------------------------- M3D
def test_m3d_vqa_gives_a_choice_and_an_open_question_per_row(tmp_path):
    src = materialise("m3d", tmp_path)
    report = run("m3d-vqa", src, tmp_path / "out")
    assert_matches_expected(tmp_path / "out", "m3d-vqa", ["train"])
    assert counts(report)["train"] == (3, 4, {"volume missing": 1})


def test_m3d_cap(tmp_path):
    src = materialise("m3d", tmp_path)
    report = run("m3d-cap", src, tmp_path / "out", splits=["train"])
    assert_matches_expected(tmp_path / "out", "m3d-cap", ["train"])
    assert counts(report)["train"] == (2, 1, {"volume missing": 1})


# --------------------------------------------------------------------------------------- CT-RATE
def test_ct_rate_rescales_and_sets_spacing(tmp_path):
    import nibabel as nib

    src = materialise("ct-rate", tmp_path)
    before = snapshot(src)
    out = tmp_path / "out"
    report = run("ct-rate", src, out)
    assert_matches_expected(out, "ct-rate", ["train", "train_vqa"])
    assert counts(report)["train"] == (5, 2, {"volume missing": 1, "empty report": 1,
                                              "_fixed volume whose header rescale is not the metadata CSV's": 1})
    assert counts(report)["train_vqa"] == (12, 8, {
        "volume missing": 1, "conversation not in human / gpt pairs": 1,
        "empty question or answer (and the rest of its conversation)": 1,
        "duplicate question (same media, question and answer)": 1})
    stored = np.arange(8 * 8 * 4).reshape(8, 8, 4)
    first = nib.load(str(out / "ct-rate-volumes/train/train_1/train_1_a/train_1_a_1.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(first.dataobj), stored - 1024)
    np.testing.assert_allclose(first.header.get_zooms(), (0.75, 0.75, 1.5))
    assert np.sign(first.affine[0, 0]) == -1  # directions kept from the source header
    second = nib.load(str(out / "ct-rate-volumes/train/train_1/train_1_a/train_1_a_2.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(second.dataobj), stored * 2 - 8192)
    np.testing.assert_allclose(second.header.get_zooms(), (0.6, 0.6, 3.0))
    assert snapshot(src) == before


# ---------------------------------------------------------------------------------------- driver
def test_out_inside_the_source_is_refused(tmp_path):
    src = materialise("vqa-rad", tmp_path)
    with pytest.raises(DataError, match="inside the source"):
        convert(get_converter("vqa-rad"), src, src / "converted")


def test_unknown_split_and_dataset(tmp_path):
    src = materialise("vqa-rad", tmp_path)
    with pytest.raises(DataError, match="no split validation"):
        convert(get_converter("vqa-rad"), src, tmp_path / "out", splits=["validation"])
    with pytest.raises(DataError, match="choose one of"):
        get_converter("mimic")


def test_every_converter_is_documented():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "datasets.md").read_text()
    for name in CONVERTERS:
        assert f"medmvl data convert {name} " in docs, name


def test_ct_rate_header_rescale_must_agree_with_the_metadata(tmp_path):
    import nibabel as nib

    from medmvl_cli.data.convert.ct_rate import write_hu_volume

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), dtype=np.int16), np.eye(4)), str(tmp_path / "v.nii"))
    raw = bytearray((tmp_path / "v.nii").read_bytes())
    raw[112:120] = np.array([1.0, -1024.0], dtype="<f4").tobytes()  # scl_slope, scl_inter (nibabel resets them on save)
    (tmp_path / "v.nii").write_bytes(bytes(raw))
    assert not write_hu_volume(tmp_path / "v.nii", tmp_path / "a.nii.gz", 2.0, -8192.0, (1.0, 1.0, 1.0))
    assert not (tmp_path / "a.nii.gz").exists()
    assert write_hu_volume(tmp_path / "v.nii", tmp_path / "b.nii.gz", 1.0, -1024.0, (0.5, 0.5, 2.0))
    assert np.asanyarray(nib.load(str(tmp_path / "b.nii.gz")).dataobj).max() == -1024


def test_ct_rate_fixed_release_is_read_when_its_header_carries_the_rescale(tmp_path):
    import nibabel as nib

    src = materialise("ct-rate", tmp_path)
    fixed = src / "dataset/train_fixed/train_3/train_3_a/train_3_a_1.nii"
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), 24, dtype=np.int16), np.eye(4)), str(fixed))
    raw = bytearray(fixed.read_bytes())
    raw[112:120] = np.array([1.0, -1024.0], dtype="<f4").tobytes()  # scl_slope, scl_inter as in the metadata row
    with __import__("gzip").open(f"{fixed}.gz", "wb") as fh:
        fh.write(bytes(raw))
    fixed.unlink()
    report = run("ct-rate", src, tmp_path / "out", splits=["train"])
    assert counts(report)["train"] == (5, 3, {"volume missing": 1, "empty report": 1})
    hu = nib.load(str(tmp_path / "out/ct-rate-volumes/train_fixed/train_3/train_3_a/train_3_a_1.nii.gz"))
    assert np.asanyarray(hu.dataobj).max() == 24 - 1024  # the rescale applied once, not twice


def test_ct_rate_vqa_json_is_streamed_and_checked(tmp_path, monkeypatch):
    from medmvl_cli.data.convert import ct_rate_vqa

    path = FIXTURES / "ct-rate/dataset/vqa/train_vqa.json"
    monkeypatch.setattr(ct_rate_vqa, "_CHUNK", 7)  # every record spans many reads
    assert list(ct_rate_vqa.json_list_items(path)) == json.loads(path.read_text())
    cases = (('{"id": 1}', "expected a JSON list"), ('[{"id": 1, "image": "train_1_a_1.nii.gz"}] ', "not CT-RATE's VQA layout"),
             ('[{"image": "x", "conversations": []}', "not valid JSON"), ("[1, 2]", "record 0 is not"))
    for n, (bad, message) in enumerate(cases):
        src = materialise("ct-rate", tmp_path / str(n))
        (src / "dataset/vqa/train_vqa.json").write_text(bad)
        with pytest.raises(DataError, match=message):
            convert(get_converter("ct-rate"), src, src.parent / "out", splits=["train_vqa"])


def test_hf_split_names_from_the_hub_layouts(tmp_path):
    from medmvl_cli.data.convert.tables import table_shards

    for rel in ("a/data/train-00000-of-00002-ab12.parquet", "a/data/train-00001-of-00002-cd34.parquet",
                "a/default/validation/0000.parquet", "a/test_clean-00000-of-00001.parquet",
                "b/data-00000-of-00001.arrow", "c/valid/data-00000-of-00001.arrow", "d.parquet"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    shards = table_shards(tmp_path / "a")
    assert list(shards) == ["train", "validation", "test_clean"] and len(shards["train"]) == 2
    assert list(table_shards(tmp_path / "b")) == ["train"]  # a single-split save_to_disk
    assert list(table_shards(tmp_path / "c")) == ["validation"]
    assert list(table_shards(tmp_path / "d.parquet")) == ["train"]


def test_an_image_a_crash_left_short_is_written_again(tmp_path):
    img = _png(5)
    _hf_parquet(tmp_path / "src", {"train": [(img, "a.png", "Is it normal?", "yes")]})
    run("hf", tmp_path / "src", tmp_path / "out")
    [record] = json.loads((tmp_path / "out" / "train.json").read_text())
    path = tmp_path / "out" / record["image"][0]
    path.write_bytes(img[:10])
    run("hf", tmp_path / "src", tmp_path / "out")
    assert path.read_bytes() == img
