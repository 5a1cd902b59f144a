"""`medmvl config show | check`: the resolved recipe, or every problem in it."""

from __future__ import annotations

import typer

from medmvl_cli.cli.options import OverridesArg, RecipeArg, StageOption

app = typer.Typer(no_args_is_help=True)


def _stage(stage: str | None) -> str | None:
    from medmvl_cli.config.schema import STAGES

    if stage is not None and stage not in STAGES:
        raise typer.BadParameter(f"{stage!r} is not one of {', '.join(STAGES)}", param_hint="--stage")
    return stage


@app.command("show")
def show(recipe: RecipeArg, overrides: OverridesArg = None, stage: StageOption = None) -> None:
    """Print the fully resolved recipe as YAML: defaults filled, stage defaults applied, paths absolute.

    Example: medmvl config show recipes/quickstart/tiny-2d.yaml train.lr=1e-4
    """
    from medmvl_cli.config.loader import dump_recipe, load_recipe

    typer.echo(dump_recipe(load_recipe(recipe, overrides or [], _stage(stage))), nl=False)


@app.command("check")
def check(recipe: RecipeArg, overrides: OverridesArg = None, stage: StageOption = None) -> None:
    """Validate a recipe and list every problem with its key path; exit 1 if there is any.

    Example: medmvl config check recipes/medmvl-ct/finetune.yaml --stage finetune
    """
    from rich.console import Console

    from medmvl_cli.config.loader import check_recipe

    _, problems = check_recipe(recipe, overrides or [], _stage(stage))
    if not problems:
        Console().print(f"[green]ok[/green] {recipe}")
        return
    err = Console(stderr=True)
    err.print(f"[red]{recipe}: {len(problems)} problem(s)[/red]")
    for p in problems:
        err.print(f"  [bold]{p.path or '(recipe)'}[/bold]: {p.message}" + (f" [dim]({p.hint})[/dim]" if p.hint else ""))
    raise typer.Exit(1)
