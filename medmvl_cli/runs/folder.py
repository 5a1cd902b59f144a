"""The run folder (CONTRACT §4) and finding runs and checkpoints in it.

```
runs/NAME/
  medmvl-run.json      the marker: written first, only by medmvl ({"format": "medmvl-run", "version": 1})
  recipe.yaml          the resolved recipe, headed by medmvl version and git revision
  model/               the final model, self-contained
  checkpoints/step-N/  resumable training state (renamed into place only when complete), with
                       medmvl-checksums.json: size and SHA-256 of every file in it (runs/checkpoint.py)
  metrics.jsonl        one line per logged step, one per evaluation
  best.json            which evaluation was the best (metric, step, value), with data.eval
  logs/                TensorBoard
  predictions.jsonl    (quickstart only) its answers on the held-out split
  FINISHED             written last
```

Ownership: only a folder that carries the marker is medmvl's to change. `--overwrite` deletes the
entries above (and the folder, when nothing else is left) and keeps anything else; `--resume`
needs the marker. A folder without it (a user's folder, or a run written before the marker
existed) is only ever read: `infer`, `export` and `demo` load its `model/` as before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from medmvl_cli import __version__
from medmvl_cli.errors import RunError, write_failure

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
FINISHED = "FINISHED"
RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
BEST = "best.json"
LOGS = "logs"
PREDICTIONS = "predictions.jsonl"
MARKER = "medmvl-run.json"
MARKER_FORMAT, MARKER_VERSION = "medmvl-run", 1
STAGED_MODEL = ".model.tmp"
# Everything medmvl writes at the top of a run folder: what --overwrite may delete.
RUN_ENTRIES = frozenset({MARKER, RECIPE, MODEL_DIR, STAGED_MODEL, CHECKPOINTS_DIR, METRICS, BEST, LOGS, PREDICTIONS, FINISHED})


def git_revision() -> str:
    """The git revision of the medmvl source in use ('+dirty' when modified), or 'unknown'."""
    source = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_marker(folder: Path) -> None:
    """Mark `folder` as a run folder medmvl made (the first thing written into it)."""
    marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "medmvl": __version__}
    write_atomic(Path(folder) / MARKER, json.dumps(marker) + "\n")


def has_marker(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8")).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def owned_entries(folder: Path) -> set[str] | None:
    """The names medmvl may replace in `folder`: its run entries when it carries the marker, else None."""
    return set(RUN_ENTRIES) if has_marker(folder) else None


def is_ours(name: str) -> bool:
    """A top-level entry of a run folder that medmvl writes (or its temporary twin `.NAME.tmp`)."""
    return name in RUN_ENTRIES or (name.startswith(".") and name.endswith(".tmp") and name[1:-4] in RUN_ENTRIES)


def refuse_unmarked(folder: Path, action: str) -> RunError:
    return RunError(
        f"{action} refused: {folder} is not a run folder medmvl made (it has no {MARKER})",
        hint="medmvl only deletes or rewrites folders it made; choose a new output_dir. A run written by an "
             "older medmvl still works for infer / export / demo, and init_from=FOLDER starts a new run from its model/",
    )


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS

    @property
    def logs_dir(self) -> Path:
        return self.root / LOGS

    @property
    def finished(self) -> bool:
        return (self.root / FINISHED).is_file()

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir()
                 if p.is_dir() and (m := STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def prepare(self, recipe_yaml: str, overwrite: bool, resume: str | None) -> Path | None:
        """Make the folder ready for a run; returns the checkpoint to resume from, if any.

        Nothing is deleted or rewritten in a folder without the marker."""
        if self.root.exists() and not self.root.is_dir():
            raise RunError(f"output_dir {self.root} is a file, not a folder", hint="set output_dir to a folder")
        if self.root.is_dir() and any(self.root.iterdir()):
            if not (overwrite or resume):
                raise RunError(
                    f"output_dir {self.root} is not empty",
                    hint="pass --resume auto to continue the run, --overwrite to start it over, "
                         "or set output_dir=runs/another-name",
                )
            if not has_marker(self.root):
                raise refuse_unmarked(self.root, "--overwrite" if overwrite else "--resume")
        if overwrite and self.root.exists():
            self._clear()
        checkpoint = self.resume_checkpoint(resume)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not has_marker(self.root):
                write_marker(self.root)
            (self.root / FINISHED).unlink(missing_ok=True)
            if checkpoint is not None:
                match = STEP_DIR.match(checkpoint.name)
                self._trim_metrics(int(match.group(1)) if match else None)
            header = f"# medmvl {__version__}, git {git_revision()}\n"
            write_atomic(self.root / RECIPE, header + recipe_yaml)
        except OSError as err:
            raise write_failure(self.root, err, "output_dir") from None
        return checkpoint

    def resume_checkpoint(self, resume: str | None) -> Path | None:
        """The verified checkpoint `--resume auto | PATH` continues from (None: start afresh)."""
        from medmvl_cli.runs.checkpoint import choose_checkpoint, verify_requested

        if resume == "auto":
            return choose_checkpoint(self.checkpoints())
        return verify_requested(Path(resume), self.checkpoints_dir) if resume else None

    def _clear(self) -> None:
        """--overwrite: delete what medmvl wrote here; the folder too when nothing else is left."""
        kept = []
        for entry in self.root.iterdir():
            if not is_ours(entry.name):
                kept.append(entry.name)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if kept:
            logger.warning("--overwrite kept %d entr%s in %s that medmvl did not write", len(kept),
                           "y" if len(kept) == 1 else "ies", self.root)
        else:
            self.root.rmdir()

    def _trim_metrics(self, step: int | None) -> None:
        """Drop metric lines logged after the checkpoint a run resumes from (they are logged again)."""
        if step is None or not self.metrics_file.is_file():
            return
        import json

        kept = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line torn by the crash
        write_atomic(self.metrics_file, "".join(f"{line}\n" for line in kept))

    def mark_finished(self) -> None:
        write_atomic(self.root / FINISHED, f"medmvl {__version__}\n")
