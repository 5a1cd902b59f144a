"""Trainer callbacks: metrics.jsonl and a rich progress bar, both on rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from medmvl_cli.errors import write_failure

METRIC_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s", "epoch")


class MetricsFile(TrainerCallback):
    """Appends one JSON line per logged training step: step, loss, lr, grad_norm, tokens/s, samples/s."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {"step": state.global_step}
        for key in METRIC_KEYS:
            if key in logs:
                row["lr" if key == "learning_rate" else key] = logs[key]
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        except OSError as err:
            raise write_failure(self.path, err, "the metrics", then="then resume with --resume auto") from None


class RichProgress(TrainerCallback):
    """A progress bar with the latest loss; hidden by --quiet."""

    def __init__(self):
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            self.progress.update(self.task, status=f"loss {logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
