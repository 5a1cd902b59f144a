"""The CLI over a table of damaged inputs and hostile outputs: every row exits 1 with one panel that
names the file, and no traceback. One tiny run is trained once per module; each row damages a copy.

Read-only and full disks are simulated by raising the OSError the system would raise (EROFS,
ENOSPC) at the write, so the table runs the same on every machine and as any user.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from tests.e2e.conftest import RECIPE_2D, RECIPE_3D

runner = CliRunner()
TRAIN = ["train.max_steps=2", "train.save_steps=1", "train.save_total_limit=null"]


@dataclass
class Trained:
    root: Path
    data: Path
    recipe: Path
    run: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    from medmvl_cli.data.synth import synthesize

    root = tmp_path_factory.mktemp("damaged")
    data = root / "data"
    synthesize(data, kind="both", n=6, seed=3, volume_size=(16, 32, 32), questions="easy")
    recipe = root / "tiny-2d.yaml"
    recipe.write_text(RECIPE_2D.format(data=data))
    run = root / "run"
    result = runner.invoke(app, ["finetune", str(recipe), "-q", f"output_dir={run}", *TRAIN])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    return Trained(root, data, recipe, run)


@dataclass
class Case:
    """A row's world: a private copy of the trained run and a folder to write in."""

    trained: Trained
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def run(self) -> Path:
        run = self.tmp / "run"
        if not run.exists():
            shutil.copytree(self.trained.run, run)
        return run

    @property
    def image(self) -> Path:
        return next((self.trained.data / "images").iterdir())

    def finetune(self, *args: str) -> list[str]:
        return ["finetune", str(self.trained.recipe), "-q", *args]

    def infer_batch(self, out: Path, *args: str) -> list[str]:
        return ["infer", "--model", str(self.run), "--data", str(self.trained.data / "test_2d.json"),
                "--out", str(out), *args]

    def resume(self, checkpoint: str) -> list[str]:
        return self.finetune(f"output_dir={self.run}", *TRAIN, "--resume", checkpoint)

    def fail_writes(self, under: Path, code: int) -> None:
        """Writes at or below `under` fail with `code` (EROFS: read-only; ENOSPC: disk full)."""
        under = under.absolute()

        def inside(path) -> bool:
            path = Path(path).absolute()
            return path == under or under in path.parents

        original_open, original_mkdir = Path.open, Path.mkdir

        def open_(path, mode="r", *args, **kwargs):
            if inside(path) and any(c in mode for c in "wax+"):
                if code == errno.ENOSPC:
                    return _FullDisk(original_open(path, mode, *args, **kwargs))
                raise OSError(code, os.strerror(code), str(path))
            return original_open(path, mode, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if inside(path) and code != errno.ENOSPC:
                raise OSError(code, os.strerror(code), str(path))
            return original_mkdir(path, *args, **kwargs)

        self.monkeypatch.setattr(Path, "open", open_)
        self.monkeypatch.setattr(Path, "mkdir", mkdir)


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, _data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garble(path: Path) -> Path:
    path.write_bytes(b"\x93NOT A VALID FILE" * 64)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _raise_enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _preset_copy(c: Case, kind: str) -> Path:
    from medmvl_cli.model.presets.models import encoder_preset_dir, llm_preset_dir

    source = llm_preset_dir("tiny-qwen2") if kind == "llm" else encoder_preset_dir("clip")
    copy = c.tmp / f"{kind}-folder"
    shutil.copytree(source, copy)
    return copy


# --------------------------------------------------------------------------------------- rows
# Each row damages a copy and returns (argv, the path the message must name).

def run_model_truncated(c):
    return ["infer", "--model", str(c.run), "--image", str(c.image)], _truncate(c.run / "model" / "model.safetensors")


def run_model_garbled(c):
    return ["export", "--model", str(c.run), "--out", str(c.tmp / "export")], _garble(c.run / "model" / "model.safetensors")


def llm_path_truncated(c):
    folder = _preset_copy(c, "llm")
    weights = _truncate(folder / "model.safetensors")
    return c.finetune("model.llm.preset=null", f"model.llm.path={folder}", "--dry-run"), weights


def encoder_folder_truncated(c):
    folder = _preset_copy(c, "encoder")
    weights = _truncate(folder / "model.safetensors")
    return c.finetune("model.image.encoder.preset=null", f"model.image.encoder.path={folder}", "--dry-run"), weights


def damaged_checkpoint(name: str, spoil):
    """A row: resume from step-2 with its file `name` spoilt (garbled, truncated, emptied)."""
    def row(c):
        damaged = spoil(c.run / "checkpoints" / "step-2" / name)
        return c.resume(str(damaged.parent)), damaged

    row.__name__ = f"checkpoint_{name}{spoil.__name__}"
    return row


def checkpoint_without_checksums(c):
    checksums = c.run / "checkpoints" / "step-2" / "medmvl-checksums.json"
    checksums.unlink()
    return c.resume(str(checksums.parent)), checksums


def checkpoint_with_a_planted_file(c):
    planted = c.run / "checkpoints" / "step-2" / "extra.pt"
    planted.write_bytes(b"pickle")
    return c.resume(str(planted.parent)), planted


def checkpoint_scheduler_empty_past_the_checksums(c):
    """Were the checksums to pass, the loader itself names the checkpoint (torch raises EOFError)."""
    import medmvl_cli.runs.checkpoint as checkpoint

    c.monkeypatch.setattr(checkpoint, "damage", lambda folder: None)
    damaged = _empty(c.run / "checkpoints" / "step-2" / "scheduler.pt")
    return c.resume(str(damaged.parent)), damaged.parent


def resume_auto_every_checkpoint_damaged(c):
    _garble(c.run / "checkpoints" / "step-1" / "optimizer.pt")
    return c.resume("auto"), _empty(c.run / "checkpoints" / "step-2" / "scheduler.pt")


def resume_auto_folder_without_marker(c):
    marker = c.run / "medmvl-run.json"
    marker.unlink()
    return c.resume("auto"), c.run


def overwrite_a_users_folder(c):
    precious = c.tmp / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    return c.finetune(f"output_dir={precious}", "--overwrite"), precious


def checkpoint_save_disk_full(c):
    import safetensors.torch

    c.monkeypatch.setattr(safetensors.torch, "save_file", _raise_enospc)
    run = c.tmp / "full"
    return c.finetune(f"output_dir={run}", "train.max_steps=1", "train.save_steps=1"), run / "checkpoints" / "step-1"


def final_model_disk_full(c):
    import medmvl_cli.model.builder as builder

    c.monkeypatch.setattr(builder, "save_model", _raise_enospc)
    run = c.tmp / "full"
    return c.finetune(f"output_dir={run}", "train.max_steps=1", "train.save_steps=5"), run / "model"


def metrics_disk_full(c):
    metrics = c.tmp / "full" / "metrics.jsonl"
    c.fail_writes(metrics, errno.ENOSPC)
    return c.finetune(f"output_dir={metrics.parent}", "train.max_steps=1"), metrics


def output_dir_read_only(c):
    readonly = c.tmp / "readonly"
    c.fail_writes(readonly, errno.EROFS)
    return c.finetune(f"output_dir={readonly / 'run'}", "train.max_steps=1"), readonly / "run"


def infer_out_read_only(c):
    out = c.tmp / "readonly" / "preds.jsonl"
    c.fail_writes(out.parent, errno.EROFS)
    return c.infer_batch(out), out


def infer_out_parent_is_a_file(c):
    parent = c.tmp / "a-file"
    parent.write_text("not a folder")
    out = parent / "preds.jsonl"
    return c.infer_batch(out), out


def infer_out_disk_full(c):
    out = c.tmp / "full" / "preds.jsonl"
    c.fail_writes(out.parent, errno.ENOSPC)
    return c.infer_batch(out), out


def infer_out_is_not_a_predictions_file(c):
    out = c.tmp / "notes.jsonl"
    out.write_text('{"patient": 1}\n{"patient": 2}')
    return c.infer_batch(out, "--overwrite"), out


def export_out_read_only(c):
    out = c.tmp / "readonly" / "export"
    c.fail_writes(out.parent, errno.EROFS)
    return ["export", "--model", str(c.run), "--out", str(out)], out


def export_out_disk_full(c):
    import medmvl_cli.model.builder as builder

    c.monkeypatch.setattr(builder, "save_model", _raise_enospc)
    out = c.tmp / "export"
    return ["export", "--model", str(c.run), "--out", str(out)], out


def export_overwrite_a_users_folder(c):
    out = c.tmp / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "llava"}')  # looks like a model, but medmvl did not write it
    return ["export", "--model", str(c.run), "--out", str(out), "--overwrite"], out


def import_overwrite_a_users_folder(c):
    out = c.tmp / "mine"
    out.mkdir()
    (out / "recipe.yaml").write_text("# mine\n")
    return ["import", "medm-vl", str(c.tmp / "src"), "--out", str(out), "--overwrite"], out


def data_cache_in_a_users_folder(c):
    recipe = c.tmp / "tiny-3d.yaml"
    recipe.write_text(RECIPE_3D.format(data=c.trained.data))
    mine = c.tmp / "mine"
    mine.mkdir()
    (mine / "scan-notes.txt").write_text("keep me")
    return ["data", "cache", str(recipe), f"data.cache_dir={mine}", "--workers", "0", "-q"], mine


def synth_overwrite_a_users_images(c):
    mine = c.tmp / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "patient-001.png").write_bytes(b"a user's image")
    return ["data", "synth", str(mine), "--kind", "2d", "--n", "4", "--overwrite"], mine


def quickstart_over_a_users_folder(c):
    mine = c.tmp / "runs" / "quickstart-2d"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    return ["quickstart", "--workdir", str(c.tmp), "--n", "4", "-q"], mine


ROWS = [
    run_model_truncated, run_model_garbled, llm_path_truncated, encoder_folder_truncated,
    damaged_checkpoint("optimizer.pt", _garble), damaged_checkpoint("trainer_state.json", _truncate),
    damaged_checkpoint("scheduler.pt", _empty), damaged_checkpoint("model.safetensors", _truncate),
    damaged_checkpoint("rng_state.pth", _garble), checkpoint_scheduler_empty_past_the_checksums,
    checkpoint_without_checksums, checkpoint_with_a_planted_file,
    resume_auto_every_checkpoint_damaged, resume_auto_folder_without_marker, overwrite_a_users_folder,
    checkpoint_save_disk_full, final_model_disk_full, metrics_disk_full, output_dir_read_only,
    infer_out_read_only, infer_out_parent_is_a_file, infer_out_disk_full, infer_out_is_not_a_predictions_file,
    export_out_read_only, export_out_disk_full, export_overwrite_a_users_folder, import_overwrite_a_users_folder,
    data_cache_in_a_users_folder, synth_overwrite_a_users_images, quickstart_over_a_users_folder,
]


def flat(output: str) -> str:
    """The output without the panel's borders and line breaks (rich wraps long paths)."""
    return "".join(line.strip().strip("│╭╮╰╯─").strip() for line in output.splitlines())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("row", ROWS, ids=[r.__name__ for r in ROWS])
def test_a_damaged_input_is_explained(row, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, named = row(Case(trained, tmp_path, monkeypatch))
    users = [p for p in (tmp_path / "mine", tmp_path / "precious", tmp_path / "notes.jsonl") if p.exists()]
    before = {p: (_snapshot(p) if p.is_dir() else p.read_bytes()) for p in users}
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # explained, not raised
    assert "Traceback" not in result.output and "Aborted" not in result.output
    assert str(named) in flat(result.output), result.output
    assert "Fix:" in result.output
    for path, content in before.items():  # what the user owns is left as it was
        assert (_snapshot(path) if path.is_dir() else path.read_bytes()) == content, path


# ------------------------------------------------------------------ what still works, and how


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(trained, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    c = Case(trained, tmp_path, monkeypatch)
    damaged = _empty(c.run / "checkpoints" / "step-2" / "scheduler.pt")
    result = runner.invoke(app, c.resume("auto"))
    assert result.exit_code == 0, result.output
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "step-2" in warning and str(damaged) in warning and "resuming from" in warning
    assert "step-1" in warning.split("resuming from")[1]
    state = json.loads((c.run / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # step 2 trained again from step 1 and saved intact
    from medmvl_cli.runs.checkpoint import damage

    assert damage(c.run / "checkpoints" / "step-2") is None


def test_overwrite_deletes_only_what_medmvl_wrote(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = Case(trained, tmp_path, monkeypatch)
    (c.run / "my-notes.txt").write_text("keep me")
    stale = c.run / "checkpoints" / "step-2"
    result = runner.invoke(app, c.finetune(f"output_dir={c.run}", "train.max_steps=1", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert (c.run / "my-notes.txt").read_text() == "keep me"
    assert not stale.exists() and (c.run / "checkpoints").is_dir() and (c.run / "FINISHED").is_file()
    assert json.loads((c.run / "medmvl-run.json").read_text())["format"] == "medmvl-run"


def test_a_run_written_before_the_marker_still_loads(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = Case(trained, tmp_path, monkeypatch)
    (c.run / "medmvl-run.json").unlink()
    result = runner.invoke(app, ["infer", "--model", str(c.run), "--image", str(c.image), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


def test_exports_carry_a_manifest_and_only_those_are_replaced(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = Case(trained, tmp_path, monkeypatch)
    out = tmp_path / "export"
    assert runner.invoke(app, ["export", "--model", str(c.run), "--out", str(out)]).exit_code == 0
    manifest = json.loads((out / "medmvl-export.json").read_text())
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    again = runner.invoke(app, ["export", "--model", str(c.run), "--out", str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    (out / "README.md").write_text("mine")
    refused = runner.invoke(app, ["export", "--model", str(c.run), "--out", str(out), "--overwrite"])
    assert refused.exit_code == 1 and "README.md" in refused.output
    assert (out / "README.md").read_text() == "mine"


def test_the_real_entry_explains_an_empty_scheduler_file(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    """The process a user runs: an empty scheduler.pt used to print only "Aborted."."""
    c = Case(trained, tmp_path, monkeypatch)
    damaged = _empty(c.run / "checkpoints" / "step-2" / "scheduler.pt")
    proc = subprocess.run([sys.executable, "-m", "medmvl_cli", *c.resume(str(damaged.parent))],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr
    assert re.search(r"scheduler\.pt", proc.stderr), proc.stderr


def test_an_error_no_loader_caught_is_still_one_panel(tmp_path, monkeypatch):
    """The mechanism behind the bare "Aborted.": click takes an EOFError for Ctrl-D."""
    import medmvl_cli.engine.stages as stages

    def empty_file(*_args, **_kwargs):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(stages, "train_stage", empty_file)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE_2D.format(data=tmp_path))
    result = runner.invoke(app, ["finetune", str(recipe), "-q"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "Aborted" not in result.output and "EOFError" in result.output and "--debug" in result.output
