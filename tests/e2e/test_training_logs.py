"""What a user watching a run sees: progress lines in a scheduler's log, eval rows in metrics.jsonl,
and a tracker run written where the run folder is."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest


def _finetune(recipe, *overrides, env=None):
    command = [sys.executable, "-m", "medmvl_cli", "finetune", str(recipe), *overrides]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_stderr_to_a_file_gets_plain_progress_lines(recipe_2d, tmp_path):
    log = tmp_path / "train.log"
    with log.open("w") as stderr:  # a file, as under nohup or a job scheduler
        done = subprocess.run([sys.executable, "-m", "medmvl_cli", "finetune", str(recipe_2d)],
                              stdout=subprocess.DEVNULL, stderr=stderr, timeout=600,
                              env={**os.environ, "MEDMVL_PROGRESS_SECONDS": "0"})
    text = log.read_text()
    assert done.returncode == 0, text
    lines = [line for line in text.splitlines() if line.startswith("training: ")]
    assert len(lines) >= 2, text
    last = lines[-1]
    assert re.match(r"training: (\d+)/\1 \(100%\), loss \d+\.\d{4}, \d+ tokens/s, [\d.]+ steps/s, ETA 0:00:00", last), last
    assert "\x1b[" not in text  # no live-bar escape codes in a log file


def test_eval_loss_reaches_metrics_jsonl(recipe_2d, synth_data):
    result = _finetune(recipe_2d, "-q", f"data.eval=[{{annotations: {synth_data}/test_2d.json}}]", "train.eval_steps=2")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (recipe_2d.parent / "runs" / "tiny-2d" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval_loss" in row]
    steps = max(row["step"] for row in rows if "loss" in row)
    # every eval_steps, and once at the end unless the last step was just evaluated
    assert [row["step"] for row in evals] == sorted({*range(2, steps + 1, 2), steps})
    assert all(row["eval_loss"] > 0 and "loss" not in row for row in evals)


@pytest.mark.slow
def test_wandb_offline_writes_its_run_in_the_run_folder(recipe_2d):
    pytest.importorskip("wandb")
    result = _finetune(recipe_2d, "-q", "train.report_to=[wandb]", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr
    runs = list((recipe_2d.parent / "runs" / "tiny-2d" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs
