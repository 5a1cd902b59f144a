"""The run folder (CONTRACT §4) and finding runs and checkpoints in it.

```
runs/NAME/
  recipe.yaml          the resolved recipe, headed by medmvl version and git revision
  model/               the final model, self-contained
  checkpoints/step-N/  resumable training state (renamed into place only when complete)
  metrics.jsonl        one line per logged step, one per evaluation
  best.json            which evaluation was the best (metric, step, value), with data.eval
  logs/                TensorBoard
  FINISHED             written last
```
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from medmvl_cli import __version__
from medmvl_cli.errors import RunError

STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
FINISHED = "FINISHED"
RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
BEST = "best.json"
LOGS = "logs"


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

    def last_checkpoint(self) -> Optional[Path]:
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def prepare(self, recipe_yaml: str, overwrite: bool, resume: Optional[str]) -> Optional[Path]:
        """Make the folder ready for a run; returns the checkpoint to resume from, if any."""
        if self.root.exists() and any(self.root.iterdir()) and not (overwrite or resume):
            raise RunError(
                f"output_dir {self.root} is not empty",
                hint="pass --resume auto to continue the run, --overwrite to start it over, "
                     "or set output_dir=runs/another-name",
            )
        if overwrite and self.root.exists():
            if not ((self.root / RECIPE).is_file() or self.checkpoints_dir.is_dir()):
                raise RunError(f"--overwrite refused: {self.root} does not look like a medmvl run folder",
                               hint="choose an empty output_dir; medmvl only deletes its own run folders")
            shutil.rmtree(self.root)
        checkpoint = None
        if resume == "auto":
            checkpoint = self.last_checkpoint()
        elif resume:
            checkpoint = Path(resume)
            if not (checkpoint / "trainer_state.json").is_file():
                raise RunError(f"--resume {resume}: not a complete checkpoint folder",
                               hint=f"use --resume auto, or one of {self.checkpoints_dir}/step-N")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / FINISHED).unlink(missing_ok=True)
        if checkpoint is not None:
            match = STEP_DIR.match(checkpoint.name)
            self._trim_metrics(int(match.group(1)) if match else None)
        header = f"# medmvl {__version__}, git {git_revision()}\n"
        write_atomic(self.root / RECIPE, header + recipe_yaml)
        return checkpoint

    def _trim_metrics(self, step: Optional[int]) -> None:
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


def newest_finished_run(runs_dir: str | Path = "runs") -> Optional[Path]:
    """The most recently finished run under `runs_dir` (by its FINISHED time), or None."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    finished = [p for p in runs_dir.iterdir() if (p / FINISHED).is_file() and (p / MODEL_DIR).is_dir()]
    return max(finished, key=lambda p: (p / FINISHED).stat().st_mtime, default=None)
