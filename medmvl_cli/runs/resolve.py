"""Which model a command uses: --model, else $MEDMVL_MODEL, else the newest finished run under ./runs."""

from __future__ import annotations

import os
from pathlib import Path

from medmvl_cli.errors import RunError
from medmvl_cli.runs.folder import FINISHED, MODEL_DIR

MODEL_ENV = "MEDMVL_MODEL"
RUNS_DIR = Path("runs")
GET_A_MODEL = (
    "train one (`medmvl quickstart`, or `medmvl finetune recipes/quickstart/tiny-2d.yaml`), import one "
    "(`medmvl import medm-vl SRC --out runs/NAME`), then pass --model runs/NAME or set MEDMVL_MODEL"
)


def newest_finished_run(runs_dir: str | Path = "runs") -> Path | None:
    """The most recently finished run under `runs_dir` (by its FINISHED time), or None."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    finished = [p for p in runs_dir.iterdir() if (p / FINISHED).is_file() and (p / MODEL_DIR).is_dir()]
    return max(finished, key=lambda p: (p / FINISHED).stat().st_mtime, default=None)


def choose_model(model: str | None) -> tuple[Path, str]:
    """(model folder, why it was chosen): --model, else $MEDMVL_MODEL, else the newest finished run
    under ./runs. `model` may name a run folder or a model folder (`runs/NAME/model`, an export)."""
    env = os.environ.get(MODEL_ENV, "").strip()
    if model:
        chosen, origin, how = model, f"--model {model}", "--model"
    elif env:
        chosen, origin, how = env, f"${MODEL_ENV}={env}", f"from ${MODEL_ENV}"
    else:
        run = newest_finished_run(RUNS_DIR)
        if run is None:
            raise RunError(f"no model: no --model, no ${MODEL_ENV}, and no finished run under ./{RUNS_DIR}"
                           + _unfinished_note(), hint=GET_A_MODEL)
        chosen, origin, how = str(run), str(run), f"the newest finished run under ./{RUNS_DIR}"
    path = Path(chosen).expanduser()
    if (path / "model" / "config.json").is_file():
        return path / "model", how
    if (path / "config.json").is_file():
        return path, how
    what = "does not exist" if not path.exists() else "is neither a run folder with model/ nor a model folder"
    raise RunError(f"{origin}: {path} {what}",
                   hint="point it at runs/NAME (a run) or a folder written by `medmvl export`; to get a model, "
                        + GET_A_MODEL)


def _unfinished_note() -> str:
    if not RUNS_DIR.is_dir():
        return ""
    unfinished = sorted(p.name for p in RUNS_DIR.iterdir() if p.is_dir() and not (p / FINISHED).is_file())
    if not unfinished:
        return ""
    return (f" ({', '.join(unfinished[:3])}{' ...' if len(unfinished) > 3 else ''} did not finish; "
            "resume with --resume auto, or pass --model to use its model/ anyway)")


def resolve_model_dir(model: str | None) -> Path:
    """--model, else $MEDMVL_MODEL, else the newest finished run under ./runs; a run folder or its model/."""
    return choose_model(model)[0]
