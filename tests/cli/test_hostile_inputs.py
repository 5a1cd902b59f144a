"""The real command line over hostile inputs: every one refused with exit 1 (or, in `data
validate`, reported as a problem of its kind), the file / key named, and never a traceback.

Bombs are headers declaring huge shapes over tiny bodies (tests/bombs.py): a reader that decoded
before checking would try to allocate gigabytes, so a regression shows as a memory error or a hang,
not as a quiet pass.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from tests import bombs

runner = CliRunner()
MB50 = 50 * 2**20
TURN = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
RECIPE = """
output_dir: runs/hostile
model:
  llm: {{preset: tiny-qwen2, max_length: 64, dtype: float32}}
  image:
    encoder: {{type: clip, preset: tiny, select_layer: -1}}
    connector: {{type: mlp}}
  image3d:
    encoder: {{type: vit3d, preset: tiny, select_layer: 0}}
    connector: {{type: spatial_pooling, pool: 2}}
    volume: {{size: [16, 32, 32], crop_foreground: false}}
data:
  train: [{{annotations: {annotations}, volume_root: {root}}}]
  cache_dir: {root}/cache
  num_workers: 0
train: {{max_steps: 1, batch_size: 1, report_to: [none], gradient_checkpointing: false}}
"""


def _plain(text: str) -> str:
    """Output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def _record(**fields) -> dict:
    return {"id": "hostile", "conversations": TURN, **fields}


def _write_jsonl(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained tiny 2D + 3D model folder: enough for `infer` to reach its readers."""
    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.inference.load import build
    from medmvl_cli.model.builder import save_model

    root = tmp_path_factory.mktemp("hostile-model")
    (root / "recipe.yaml").write_text(RECIPE.format(annotations="none.json", root=root))
    model, processor = build(load_recipe(root / "recipe.yaml", stage="finetune"), dtype="float32")
    return save_model(model, root / "model", processor)


# ------------------------------------------------------------------------------------------ table
@dataclass
class Case:
    """`make(tmp)` builds the hostile input and returns (argv, the name the output must show);
    `kind`: the `data validate` problem kind expected, else the command must exit 1 saying `says`."""

    make: Callable[[Path, Path], tuple[list[str], str]]
    kind: str | None = None
    says: str = ""


def validate_media(key: str, build: Callable[[Path], Path]):
    def make(tmp: Path, _model: Path):
        target = build(tmp)
        annotations = _write_jsonl(tmp / "ann.jsonl", _record(
            **{key: [target.name]}, conversations=[{"from": "human", "value": f"<{key}>\nQ"}, TURN[1]]))
        return ["data", "validate", str(annotations), "--json"], target.name
    return make


def infer_media(flag: str, build: Callable[[Path], Path], *extra: str, named: str | None = None):
    def make(tmp: Path, model: Path):
        target = build(tmp)
        args = ["infer", "--model", str(model), flag, str(target), "--max-new-tokens", "1", *extra]
        return args, named or target.name
    return make


def validate_text(text: str, suffix: str = ".jsonl", strict: bool = False):
    def make(tmp: Path, _model: Path):
        path = tmp / f"ann{suffix}"
        path.write_text(text)
        return ["data", "validate", str(path), "--json", *(["--strict-paths"] if strict else [])], path.name
    return make


def deep(levels: int = 100_000) -> str:
    return "[" * levels + "]" * levels


def symlink_out(tmp: Path) -> Path:
    """root/inside.png -> ../outside/secret.png, a file that is not even an image: if it were
    opened, `unreadable` would join `escapes_root`."""
    (tmp / "outside").mkdir()
    (tmp / "outside" / "secret.png").write_bytes(b"not a png")
    (tmp / "root").mkdir()
    os.symlink(tmp / "outside" / "secret.png", tmp / "root" / "inside.png")
    return tmp / "root" / "ann.jsonl"


def strict_symlink(tmp: Path, _model: Path):
    annotations = _write_jsonl(symlink_out(tmp), _record(image="inside.png", conversations=[
        {"from": "human", "value": "<image>\nQ"}, TURN[1]]))
    return ["data", "validate", str(annotations), "--json", "--strict-paths"], "inside.png"


def recipe_check(text: str):
    def make(tmp: Path, _model: Path):
        path = tmp / "r.yaml"
        path.write_text(text)
        return ["config", "check", str(path)], "r.yaml"
    return make


def with_small_volume(*command: str):
    """A genuine 8x16x16 volume and a recipe with data.max_voxels: 1000: the recipe's limit
    reaches `data validate --recipe`, the volume cache and the training dataset."""
    def make(tmp: Path, _model: Path):
        np.save(tmp / "ct.npy", np.zeros((8, 16, 16), np.int16))
        annotations = tmp / "train.json"
        annotations.write_text(json.dumps([_record(image3d="ct.npy", conversations=[
            {"from": "human", "value": "<image3d>\nQ"}, TURN[1]])]))
        recipe = tmp / "recipe.yaml"
        recipe.write_text(RECIPE.format(annotations=annotations, root=tmp).replace(
            "  num_workers: 0\n", "  num_workers: 0\n  max_voxels: 1000\n"))
        if command[-1] == "validate":
            return [*command, str(annotations), "--recipe", str(recipe), "--json"], "ct.npy"
        return [*command, str(recipe), f"output_dir={tmp / 'run'}"], "ct.npy"
    return make


DUPLICATES = "model:\n  llm: {preset: tiny-qwen2}\n  image: {encoder: {type: clip, preset: tiny}, connector: {type: mlp}}\ntrain:\n  lr: 1.0e-4\n  epochs: 1\n  lr: 2.0e-4\n"
ALIAS = "model:\n  llm: {preset: tiny-qwen2}\n  image: {encoder: {type: clip, preset: tiny}, connector: {type: mlp}}\nlearning_rate: 1.0e-4\n"
HUGE_TURN = json.dumps(_record(conversations=[{"from": "human", "value": "x" * MB50}, TURN[1]]))

CASES = {
    # volumes: header over max_voxels, never decoded
    "nifti-gz-validate": Case(validate_media("image3d", lambda t: bombs.nifti(t / "bomb.nii.gz")), kind="too_large"),
    "nifti-gz-infer": Case(infer_media("--volume", lambda t: bombs.nifti(t / "bomb.nii.gz")), says="over the limit"),
    "nrrd-validate": Case(validate_media("image3d", lambda t: bombs.nrrd(t / "bomb.nrrd")), kind="too_large"),
    "nrrd-infer": Case(infer_media("--volume", lambda t: bombs.nrrd(t / "bomb.nrrd")), says="over the limit"),
    "mha-infer": Case(infer_media("--volume", lambda t: bombs.mha(t / "bomb.mha")), says="over the limit"),
    "npy-validate": Case(validate_media("image3d", lambda t: bombs.npy(t / "bomb.npy")), kind="too_large"),
    "dicom-series-validate": Case(validate_media("image3d", lambda t: bombs.dicom_series(t / "series")), kind="too_large"),
    "dicom-series-infer": Case(infer_media("--volume", lambda t: bombs.dicom_series(t / "series")), says="over the limit"),
    "limit-raised-still-refused": Case(infer_media("--volume", lambda t: bombs.nifti(t / "bomb.nii.gz"),
                                                   "--max-voxels", "1000000000"), says="--max-voxels"),
    # 2D: PIL's own bomb error (2.5 G pixels), medmvl's limit (100 M pixels), a DICOM slice
    "png-bomb-infer": Case(infer_media("--image", lambda t: bombs.png(t / "bomb.png")), says="--max-pixels"),
    "png-over-limit-validate": Case(validate_media("image", lambda t: bombs.png(t / "big.png", 10000, 10000)), kind="too_large"),
    "dicom-image-infer": Case(infer_media("--image", lambda t: bombs.dicom(t / "bomb.dcm")), says="over the limit"),
    # the recipe's data.max_voxels reaches the volume cache and the training dataset
    "recipe-limit-data-validate": Case(with_small_volume("data", "validate"), kind="too_large"),
    "recipe-limit-data-cache": Case(with_small_volume("data", "cache"), says="over the limit of 1,000"),
    "recipe-limit-finetune": Case(with_small_volume("finetune"), says="over the limit of 1,000"),
    # text
    "50mb-turn-validate": Case(validate_text(HUGE_TURN + "\n"), kind="too_long"),
    "50mb-prompt-infer": Case(infer_media("--image", lambda t: bombs.png(t / "ok.png", 8, 8),
                                          "--prompt", "y" * MB50, named="turn 0"), says="characters"),
    "nested-jsonl-validate": Case(validate_text(f'{{"id": "a", "conversations": {deep()}}}\n'), kind="json"),
    "nested-json-list-validate": Case(validate_text(f'[{json.dumps(_record())},\n{deep()}]', ".json"),
                                      says="record 1 (line 2)"),
    # paths and recipes
    "symlink-escape-strict": Case(strict_symlink, kind="escapes_root"),
    "duplicate-recipe-key": Case(recipe_check(DUPLICATES), says="train.lr: written twice (lines 5 and 7)"),
    "alias-recipe-key": Case(recipe_check(ALIAS), says="did you mean train.lr?"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_by_name_without_a_traceback(name, tmp_path, model_dir, monkeypatch):
    case = CASES[name]
    monkeypatch.chdir(tmp_path)
    args, named = case.make(tmp_path, model_dir)
    result = runner.invoke(app, args)
    output = _plain(result.output)
    assert "Traceback" not in result.output and not isinstance(result.exception, (RecursionError, MemoryError))
    assert result.exit_code == 1, output[-2000:]
    assert named in output
    if case.kind is not None:
        report = json.loads(result.stdout)
        kinds = {issue["kind"] for entry in report["problems"] for issue in entry["problems"]}
        assert kinds == {case.kind}, report["problems"]
    else:
        assert case.says in output, output[-2000:]


def test_a_50mb_turn_in_batch_infer_gets_an_error_row_and_the_rest_are_answered(tmp_path, model_dir):
    bombs.png(tmp_path / "ok.png", 8, 8)
    image = {"image": ["ok.png"]}
    question = [{"from": "human", "value": "<image>\nQ"}]
    annotations = _write_jsonl(tmp_path / "q.jsonl", {"id": "huge", **image, "conversations": [
        {"from": "human", "value": "<image>\n" + "z" * MB50}]}, {"id": "fine", **image, "conversations": question})
    out = tmp_path / "p.jsonl"
    result = runner.invoke(app, ["infer", "--model", str(model_dir), "--data", str(annotations), "--out", str(out),
                                 "-q", "--max-new-tokens", "1", "--batch-size", "2"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert "characters, over the limit of 1,024" in rows["huge"]["error"]  # max_length 64 x 16
    assert "error" not in rows["fine"] and rows["fine"]["prediction"] is not None
