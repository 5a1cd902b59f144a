"""`medmvl env`: versions, devices, and which optional parts are present."""

from __future__ import annotations

import typer

PACKAGES = (
    "torch", "transformers", "tokenizers", "peft", "accelerate", "monai", "SimpleITK", "pydicom",
    "nibabel", "deepspeed", "flash-attn", "gradio",
)


def env(json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Print versions (python, torch, transformers, ... 'absent' where not installed), devices and bf16 support.

    Example: medmvl env --json
    """
    import json

    from medmvl_cli.engine.environment import describe_environment
    from medmvl_cli.threads import current as current_threads

    info = describe_environment(PACKAGES)
    if json_output:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="medmvl environment", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, version in info["versions"].items():
        table.add_row(name, version or "[dim]absent[/dim]")
    table.add_row("cpu threads", current_threads().describe())
    for gpu in info["gpus"] or [{"name": "none", "memory_gib": None}]:
        memory = f" ({gpu['memory_gib']:.0f} GiB)" if gpu["memory_gib"] else ""
        table.add_row("gpu", f"{gpu['name']}{memory}")
    table.add_row("bf16 fast here", "yes" if info["bf16_fast"] else "no (train in float32)")
    Console().print(table)
