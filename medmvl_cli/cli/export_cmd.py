"""`medmvl export`: a run's model as a self-contained medmvl folder or as transformers' LLaVA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

FORMATS = ("medmvl", "hf-llava")
DTYPES = ("float32", "bfloat16", "float16")


def export(
    out: Annotated[Path, typer.Option("--out", help="Folder to write (built beside it, then renamed into place).", show_default=False)],
    model: Annotated[str | None, typer.Option("--model", help="Run folder or model folder; default $MEDMVL_MODEL, else the newest finished run under ./runs.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="medmvl: a folder medmvl infer / demo load; hf-llava: transformers' LlavaForConditionalGeneration + LlavaProcessor.")] = "medmvl",
    merge_lora: Annotated[bool, typer.Option("--merge-lora", help="Fold a LoRA adapter into the LLM's weights (hf-llava always does).")] = False,
    transformers4: Annotated[bool, typer.Option("--transformers4", help="hf-llava only: write the layout transformers 4.x loads.")] = False,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Store weights as float32 | bfloat16 | float16 (default: as saved).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out that holds an exported model.")] = False,
) -> None:
    """Export a trained (or imported) model.

    Examples:
      medmvl export --model runs/ct-qwen-lora --out exports/ct-qwen --merge-lora
      medmvl export --model runs/xray-clip --out exports/xray-llava --format hf-llava
      medmvl export --model runs/xray-clip --out exports/xray-llava-4x --format hf-llava --transformers4
    """
    from rich.console import Console

    from medmvl_cli.runs.resolve import resolve_model_dir

    if fmt not in FORMATS:
        raise typer.BadParameter(f"use one of {', '.join(FORMATS)}", param_hint="--format")
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"use one of {', '.join(DTYPES)}", param_hint="--dtype")
    if transformers4 and fmt != "hf-llava":
        raise typer.BadParameter("--transformers4 applies to --format hf-llava only", param_hint="--transformers4")
    model_dir = resolve_model_dir(model)
    Console(stderr=True).print(f"model: {model_dir}", highlight=False, soft_wrap=True)
    if fmt == "medmvl":
        from medmvl_cli.interop.export_native import export_medmvl

        written = export_medmvl(model_dir, out, merge_lora=merge_lora, overwrite=overwrite, dtype=dtype)
    else:
        from medmvl_cli.interop.export_hf import export_hf_llava

        written = export_hf_llava(model_dir, out, overwrite=overwrite, transformers4=transformers4, dtype=dtype)
    typer.echo(str(written))
