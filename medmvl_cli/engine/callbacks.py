"""Trainer callbacks: metrics.jsonl and progress (a bar in a terminal, plain lines elsewhere), rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from medmvl_cli.errors import write_failure

METRIC_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s", "epoch")
SHORT_NAMES = {"learning_rate": "lr"}


class MetricsFile(TrainerCallback):
    """Appends one JSON line per logged training step (step, loss, lr, grad_norm, tokens/s, samples/s)
    and one per evaluation (step and every `eval_*` value the trainer reports)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            row = {SHORT_NAMES.get(key, key): logs[key] for key in METRIC_KEYS if key in logs}
        else:
            row = {key: value for key, value in logs.items() if key.startswith("eval_")}
        if row:
            self._append({"step": state.global_step, **row})

    def _append(self, row: dict) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        except OSError as err:
            raise write_failure(self.path, err, "the metrics", then="then resume with --resume auto") from None


class TrainingProgress(TrainerCallback):
    """Steps done, latest loss and tokens/s: a rich bar in a terminal, a plain line every
    $MEDMVL_PROGRESS_SECONDS elsewhere (a scheduler's log file); hidden by --quiet."""

    def __init__(self):
        self.progress = None
        self.status = ""

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from medmvl_cli.progress import JobProgress

        self.progress = JobProgress("training", unit="steps").__enter__()
        self.progress.update(state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(state.global_step, state.max_steps, self.status)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            self.status = f"loss {logs['loss']:.4f}"
            if "tokens_per_s" in logs:
                self.status += f", {logs['tokens_per_s']:.0f} tokens/s"

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
            self.progress = None
