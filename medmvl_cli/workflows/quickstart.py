"""The quickstart: synthetic data -> train tiny presets -> answer the held-out split -> accuracy.

The synthetic questions can only be answered by looking at the image (which quadrant / which
lung holds the lesion), so accuracy far above chance shows the model reads its image tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from medmvl_cli.constants import RECIPES_DIR
from medmvl_cli.errors import RunError

logger = logging.getLogger(__name__)

RECIPES = RECIPES_DIR / "quickstart"
CASES = {"2d": 400, "3d": 240}


@dataclass
class QuickstartResult:
    kind: str
    run_dir: Path
    predictions: Path
    accuracy: float
    chance: float
    n_test: int
    train_seconds: float
    total_seconds: float


def quickstart_recipe(kind: str) -> Path:
    recipe = RECIPES / f"tiny-{'2d' if kind == '2d' else 'ct'}.yaml"
    if not recipe.is_file():
        raise RunError(f"the quickstart recipe {recipe} is missing",
                       hint="reinstall medmvl: its recipes ship inside the package")
    return recipe


def run_quickstart(kind: str, workdir: Path, n: int | None = None, overrides: tuple[str, ...] = (),
                   quiet: bool = False) -> QuickstartResult:
    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.data.synth import EASY, QUESTIONS, synthesize
    from medmvl_cli.engine.stages import train_stage
    from medmvl_cli.evaluation.metrics import exact_match
    from medmvl_cli.evaluation.predictions_file import read_predictions
    from medmvl_cli.inference.generate import GenerationSettings, Predictor
    from medmvl_cli.inference.predictions import predict_file

    start = time.perf_counter()
    data = workdir / "data" / "quickstart"
    train_file, test_file = data / f"train_{kind}.json", data / f"test_{kind}.json"
    if not (train_file.is_file() and test_file.is_file()):
        logger.info("writing the synthetic %s dataset to %s", kind, data)
        synthesize(data, kind=kind, n=n or CASES[kind], seed=0, questions="easy")
    root_key = "image_root" if kind == "2d" else "volume_root"
    run_dir = workdir / "runs" / f"quickstart-{kind}"
    recipe = load_recipe(quickstart_recipe(kind), [
        f"output_dir={run_dir}",
        f"data.train.0.annotations={train_file}", f"data.train.0.{root_key}={data}",
        f"data.eval.0.annotations={test_file}", f"data.eval.0.{root_key}={data}",
        *([f"data.cache_dir={data / 'cache'}"] if kind == "3d" else []),
        *overrides,
    ], stage="finetune")
    train_start = time.perf_counter()
    train_stage(recipe, overwrite=run_dir.exists(), quiet=quiet)
    train_seconds = time.perf_counter() - train_start
    predictions = run_dir / "predictions.jsonl"
    predictor = Predictor(run_dir / "model")
    predict_file(predictor, test_file, predictions, GenerationSettings(max_new_tokens=8), batch_size=16, overwrite=True)
    rows = [r for r in read_predictions(predictions) if r.prediction is not None]
    if not rows:
        raise RunError(f"no predictions in {predictions}")
    accuracy = sum(exact_match(r.prediction, r.answer) for r in rows) / len(rows)
    classes = QUESTIONS[(kind, EASY[kind])][2]
    return QuickstartResult(kind, run_dir, predictions, accuracy, 1 / len(classes), len(rows),
                            train_seconds, time.perf_counter() - start)
