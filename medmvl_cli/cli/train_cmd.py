"""`medmvl pretrain | finetune | lora`: train one stage of a recipe into its run folder."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from medmvl_cli.cli.options import OverridesArg, RecipeArg

logger = logging.getLogger(__name__)
DIST = "Distributed"

ResumeOption = Annotated[str | None, typer.Option("--resume", help="`auto` (last complete checkpoint) or a checkpoint folder.")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Delete an existing run folder and start over.")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe, parameter counts and launch command; train nothing.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
NprocOption = Annotated[int, typer.Option("--nproc-per-node", min=1, help="Processes (GPUs) on this node.", rich_help_panel=DIST)]
NnodesOption = Annotated[int, typer.Option("--nnodes", min=1, help="Number of nodes.", rich_help_panel=DIST)]
NodeRankOption = Annotated[int, typer.Option("--node-rank", min=0, help="Rank of this node.", rich_help_panel=DIST)]
MasterAddrOption = Annotated[str, typer.Option("--master-addr", help="Address of the rank-0 node.", rich_help_panel=DIST)]
MasterPortOption = Annotated[int, typer.Option("--master-port", help="Port of the rank-0 node.", rich_help_panel=DIST)]

DISTRIBUTED_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def _strip_distributed(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in DISTRIBUTED_FLAGS:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def _run(stage: str, recipe_path, overrides, resume, overwrite, dry_run, quiet, launch_options) -> None:
    from medmvl_cli.config.loader import dump_recipe, load_recipe
    from medmvl_cli.engine.launch import format_command, launch_command, needs_launch, run_launched

    recipe = load_recipe(recipe_path, overrides or [], stage)
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("medmvl", "__main__.py")) else None
    medmvl_args = _strip_distributed(argv) if argv else [stage, str(recipe_path), *(overrides or [])]
    launching = needs_launch(launch_options, recipe.distributed.deepspeed)
    command = launch_command(launch_options, medmvl_args) if launching else ["medmvl", *medmvl_args]
    if dry_run:
        _dry_run(recipe, dump_recipe(recipe), format_command([c for c in command if c != "--dry-run"]))
        return
    if launching:
        raise typer.Exit(run_launched(command, launch_options))
    from medmvl_cli.engine.stages import train_stage

    run = train_stage(recipe, resume=resume, overwrite=overwrite, quiet=quiet)
    typer.echo(str(run))


def _dry_run(recipe, recipe_yaml: str, command: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from medmvl_cli.engine.stages import build_training_model
    from medmvl_cli.model.trainable import parameter_counts

    typer.echo(recipe_yaml, nl=False)
    model, _ = build_training_model(recipe)
    table = Table(title="parameters")
    for column in ("component", "total", "trainable"):
        table.add_column(column, justify="right" if column != "component" else "left")
    for name, (total, trainable) in parameter_counts(model).items():
        table.add_row(name, f"{total:,}", f"{trainable:,}")
    console = Console()
    console.print(table)
    console.print(f"launch: {command}", soft_wrap=True)


def _make(stage: str, summary: str):
    def command(
        recipe: RecipeArg, overrides: OverridesArg = None, resume: ResumeOption = None,
        overwrite: OverwriteOption = False, dry_run: DryRunOption = False, quiet: QuietOption = False,
        nproc_per_node: NprocOption = 1, nnodes: NnodesOption = 1, node_rank: NodeRankOption = 0,
        master_addr: MasterAddrOption = "127.0.0.1", master_port: MasterPortOption = 29500,
    ) -> None:
        from medmvl_cli.engine.launch import LaunchOptions

        _run(stage, recipe, overrides, resume, overwrite, dry_run, quiet,
             LaunchOptions(nproc_per_node, nnodes, node_rank, master_addr, master_port))

    command.__doc__ = (
        f"{summary}\n\nStage defaults apply to `trainable` (see docs/recipes.md); the recipe overrides them.\n\n"
        f"Example: medmvl {stage} recipes/quickstart/tiny-2d.yaml train.max_steps=20 --dry-run"
    )
    command.__name__ = stage
    return command


pretrain = _make("pretrain", "Pretrain: align the connectors (LLM and encoders frozen).")
finetune = _make("finetune", "Finetune: train the LLM and connectors in full.")
lora = _make("lora", "LoRA: train a LoRA adapter on the LLM and the connectors in full.")
