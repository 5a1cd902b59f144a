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
        _print_table(Console(), report)
    Console(stderr=True).print(f"Per-sample scores: {report.scores_file}", highlight=False, soft_wrap=True)


def _print_table(console, report) -> None:
    from rich.table import Table

    table = Table(title="medmvl eval")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    # The metrics that apply to this file first; those it gives no value for after them.
    for result in sorted(report.metrics, key=lambda r: r.value is None):
        if result.value is not None:
            value = f"{result.value:.4f}"
        else:
            value = "[dim]not computed[/dim]" if result.n else "[dim]-[/dim]"
        table.add_row(result.label, value, str(result.n))
    console.print(table)
    c = report.counts
    lines = [
        f"{report.predictions}: {c['rows']} rows, {c['scored']} scored "
        f"({c['closed']} closed: {c['yes_no']} yes/no, {c['choice']} multiple choice; {c['open']} open), "
        f"{c['errors']} with an error, {c['no_answer']} without an answer",
        *(f"{r.label}: not computed, {r.reason}" for r in report.metrics if r.value is None and r.n),
    ]
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
