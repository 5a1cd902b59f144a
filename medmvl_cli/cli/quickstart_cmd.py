"""`medmvl quickstart`: the whole loop, offline, on built-in tiny models and synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def quickstart(
    kind: Annotated[str, typer.Option("--kind", help="2d (films, 4 quadrants) or 3d (CT volumes, left / right lung).")] = "2d",
    workdir: Annotated[Path, typer.Option("--workdir", help="Where data/quickstart and runs/quickstart-KIND go.")] = Path("."),
    n: Annotated[int | None, typer.Option("--n", min=4, help="Synthetic cases to generate when the data is missing.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Recipe overrides, e.g. train.epochs=10.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train tiny models on synthetic data and print held-out accuracy against chance.

    Generates the synthetic dataset if it is missing, trains on the CPU in minutes, answers the
    held-out split.

    Example: medmvl quickstart --kind 3d
    """
    from rich.console import Console
    from rich.table import Table

    from medmvl_cli.workflows.quickstart import run_quickstart

    if kind not in ("2d", "3d"):
        raise typer.BadParameter("use 2d or 3d", param_hint="--kind")
    result = run_quickstart(kind, workdir, n, tuple(overrides or ()), quiet)
    table = Table(title=f"quickstart ({kind})")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("held-out accuracy", f"{result.accuracy:.3f} ({result.n_test} questions)")
    table.add_row("chance", f"{result.chance:.3f}")
    table.add_row("training time", f"{result.train_seconds:.0f} s")
    table.add_row("total time", f"{result.total_seconds:.0f} s")
    table.add_row("run folder", str(result.run_dir))
    table.add_row("predictions", str(result.predictions))
    Console().print(table)
