"""`medmvl eval`: score a predictions file (LLaVA-Med closed / open, choices, BLEU, ROUGE, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def eval_predictions(
    predictions: Annotated[
        Path,
        typer.Argument(help="Predictions JSONL written by `medmvl infer --data ... --out FILE`.", show_default=False),
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Score predictions against their reference answers.

    Closed accuracy and open recall exactly as LLaVA-Med computes them (plus a whole-word variant),
    exact match, multiple-choice accuracy (M3D-Bench), BLEU-1..4, ROUGE-1 / ROUGE-L, METEOR and
    BERTScore per sample, then averaged. Metrics whose data or model is not on this machine are
    listed as not computed, with the reason. Per-sample scores go to PREDICTIONS.scores.jsonl.

    Example: medmvl eval runs/ct-qwen/preds.jsonl --json
    """
    import json

    from rich.console import Console

    from medmvl_cli.evaluation import evaluate_predictions

    report = evaluate_predictions(predictions)
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(_table(report))
    Console(stderr=True).print(f"Per-sample scores: {report.scores_file}", highlight=False, soft_wrap=True)


def _table(report):
    from rich.table import Table

    c = report.counts
    caption = (
        f"{c['rows']} rows: {c['scored']} scored ({c['closed']} closed, {c['open']} open, {c['choice']} choice), "
        f"{c['errors']} errors, {c['no_answer']} without an answer"
    )
    notes = [f"{r.label}: not computed, {r.reason}" for r in report.metrics if r.value is None and r.n]
    table = Table(title=f"medmvl eval: {report.predictions}", caption="\n".join([caption, *notes]), caption_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    for result in report.metrics:
        if result.value is not None:
            value = f"{result.value:.4f}"
        else:
            value = "[dim]not computed[/dim]" if result.n else "[dim]-[/dim]"
        table.add_row(result.label, value, str(result.n))
    return table
