"""`medmvl data validate | synth` through the real command line (typer's CliRunner)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from tests.conftest import REFERENCE
from tests.unit.test_validate import CLEAN, DEFECTS, make_media

runner = CliRunner()


def _plain(text: str) -> str:
    """Error panel text without its box and line wrapping."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


@pytest.fixture
def defect_file(tmp_path):
    make_media(tmp_path)
    lines = [json.dumps(rec) for _, rec, _ in DEFECTS] + [json.dumps(rec) for rec in CLEAN]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "synth"
    result = runner.invoke(app, ["data", "synth", str(out), "--n", "12", "--seed", "5",
                                 "--image-size", "32", "--volume-size", "12", "24", "24"])
    assert result.exit_code == 0, result.output
    return out


def test_data_group_is_listed():
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0
    assert "validate" in result.output and "synth" in result.output


def test_synth_writes_the_four_files(synth_dir):
    for name in ("train_2d.json", "test_2d.json", "train_3d.json", "test_3d.json"):
        assert (synth_dir / name).is_file()
    assert len(list((synth_dir / "images").glob("*.png"))) == 12
    assert len(list((synth_dir / "volumes").glob("*.nii.gz"))) == 12


def test_synth_refuses_to_overwrite(synth_dir):
    result = runner.invoke(app, ["data", "synth", str(synth_dir), "--n", "4"])
    assert result.exit_code == 1
    assert "--overwrite" in _plain(result.stderr) and result.stdout == ""


def test_synth_bad_kind_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["data", "synth", str(tmp_path), "--kind", "4d"])
    assert result.exit_code == 2


@pytest.mark.parametrize("name", ["train_2d", "test_2d", "train_3d", "test_3d"])
def test_validate_clean_synthetic_set_exits_0(synth_dir, name):
    result = runner.invoke(app, ["data", "validate", str(synth_dir / f"{name}.json")])
    assert result.exit_code == 0, result.output
    assert "ok" in result.stdout and "no problems" in result.stdout


def test_validate_defects_exit_1_and_name_every_record(defect_file):
    root = defect_file.parent
    before = hashlib.sha256(defect_file.read_bytes()).hexdigest()
    result = runner.invoke(app, ["data", "validate", str(defect_file), "--image-root", str(root / "img"),
                                 "--volume-root", str(root / "ct"), "--strict-paths", "--show", "100"])
    assert result.exit_code == 1
    assert hashlib.sha256(defect_file.read_bytes()).hexdigest() == before
    out = result.stdout
    for _, record, kind in DEFECTS:
        if kind is not None:
            assert record["id"] in out and kind in out
    for rec in CLEAN:
        assert rec["id"] not in out


def test_validate_json_output(defect_file):
    root = defect_file.parent
    before = defect_file.read_bytes()
    result = runner.invoke(app, ["data", "validate", str(defect_file), "--image-root", str(root / "img"),
                                 "--volume-root", str(root / "ct"), "--strict-paths", "--json", "--workers", "2"])
    assert result.exit_code == 1
    assert defect_file.read_bytes() == before
    data = json.loads(result.stdout)
    assert data["records"] == len(DEFECTS) + len(CLEAN)
    flagged = {p["id"]: {i["kind"] for i in p["problems"]} for p in data["problems"]}
    for label, record, kind in DEFECTS:
        if kind is not None:
            assert kind in flagged[record["id"]], label
    lines = defect_file.read_text().splitlines()
    for entry in data["problems"]:
        assert json.loads(lines[entry["line"] - 1])["id"] == entry["id"]
        assert entry["index"] == entry["line"] - 1
    assert sum(data["totals"].values()) == sum(len(p["problems"]) for p in data["problems"])
    assert len(data["totals"]) >= 12


def test_validate_reference_files_report_missing_files_only():
    path = REFERENCE / "inference_3d.json"
    if not path.is_file():
        pytest.skip("reference files not present")
    result = runner.invoke(app, ["data", "validate", str(path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["totals"] == {"missing_file": 5}


def test_validate_unreadable_file_is_a_short_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[{\"id\": 1,,}]")
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert "not valid JSON at line 1" in _plain(result.stderr) and "Traceback" not in result.output


def test_validate_missing_file(tmp_path):
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "none.json")])
    assert result.exit_code == 1 and "does not exist" in _plain(result.stderr)


RECIPE = """
model:
  llm: {preset: tiny-qwen2, max_length: 55, template: qwen2}
  image:
    encoder: {type: clip, preset: tiny}
    connector: {type: mlp}
data:
  train:
    - {annotations: synth/train_2d.json, image_root: synth}
"""


def test_validate_with_recipe_reports_lengths(synth_dir):
    (synth_dir.parent / "recipe.yaml").write_text(RECIPE)
    result = runner.invoke(app, ["data", "validate", str(synth_dir / "train_2d.json"),
                                 "--recipe", str(synth_dir.parent / "recipe.yaml"), "--json"])
    data = json.loads(result.stdout)
    lengths = data["lengths"]
    assert lengths["measured"] == data["records"] and lengths["max_length"] == 55
    assert lengths["placeholder_lengths"] == {"<image>": 16}
    # Closed answers fit in 55 tokens (system prompt included); reports with a lesion do not.
    dropped = [i for ids in lengths["dropped_ids"].values() for i in ids]
    train = {r["id"]: r for r in json.loads((synth_dir / "train_2d.json").read_text())}
    assert dropped and all(train[i]["task"] == "report" for i in dropped)
    assert result.exit_code == 0  # lengths are reported, not record problems
    text = runner.invoke(app, ["data", "validate", str(synth_dir / "train_2d.json"),
                               "--recipe", str(synth_dir.parent / "recipe.yaml")])
    assert "p50" in text.stdout and "dropped" in text.stdout


def test_convert_prints_counts_and_json(tmp_path):
    from tests.unit.test_convert import materialise

    src = materialise("pmc-vqa", tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["data", "convert", "pmc-vqa", str(src), "--out", str(out), "--split", "train"])
    assert result.exit_code == 0, result.output
    assert "dropped 1 (image missing)" in result.output
    result = runner.invoke(app, ["data", "convert", "pmc-vqa", str(src), "--out", str(out), "--split", "train", "--json"])
    report = json.loads(result.output)
    assert report["splits"]["train"]["written"] == 2 and report["splits"]["train"]["validation"]["ok"]
    assert json.loads((out / "conversion.json").read_text()) == report


def test_convert_explains_bad_input(tmp_path):
    from tests.unit.test_convert import materialise

    src = materialise("pathvqa-pickle", tmp_path)
    result = runner.invoke(app, ["data", "convert", "pathvqa", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    text = _plain(result.output)
    assert "pickled release is not read" in text and "Traceback" not in result.output
    result = runner.invoke(app, ["data", "convert", "mimic", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "pmc-vqa" in _plain(result.output)  # usage error listing the choices


def test_convert_choices_are_the_registry():
    from medmvl_cli.cli.data_cmd import Dataset
    from medmvl_cli.data.convert import CONVERTERS

    assert [d.value for d in Dataset] == list(CONVERTERS)
