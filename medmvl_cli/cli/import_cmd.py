"""`medmvl import`: checkpoints of other toolkits -> medmvl run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich")

SOURCES = "Where the parts MedM-VL did not save are read from"
BRANCHES = ("auto", "2d", "slices", "both")
SLICE_POOLINGS = ("concat", "mean")


@app.command("medm-vl")
def medm_vl(
    src: Annotated[Path, typer.Argument(help="A MedM-VL checkpoint folder (config.json + model.safetensors), as published (release-day layout) or as MedM-VL's current code saves it (model_type lvlm).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The run folder to write (recipe.yaml, model/, FINISHED).", show_default=False)],
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Tokenizer folder, when SRC has no tokenizer files.", rich_help_panel=SOURCES)] = None,
    llm: Annotated[Path | None, typer.Option("--llm", help="The LLM folder MedM-VL started from (its config.json), when SRC's config.json lacks the LLM's config and lvlm_llm_name_or_path is not a local folder.", rich_help_panel=SOURCES)] = None,
    image_encoder: Annotated[Path | None, typer.Option("--image-encoder", help="The 2D encoder's folder (config.json, preprocessor_config.json), when lvlm_encoder_image_name_or_path is not a local folder.", rich_help_panel=SOURCES)] = None,
    image3d_encoder: Annotated[Path | None, typer.Option("--image3d-encoder", help="The 3D encoder's folder (its config.json), when lvlm_encoder_image3d_name_or_path is not a local folder.", rich_help_panel=SOURCES)] = None,
    template: Annotated[str | None, typer.Option("--template", help="Chat template; default medmvl-<llm type> (MedM-VL's prompt format).")] = None,
    branch: Annotated[str, typer.Option("--as", help="The 2D encoder as: 2d (images), slices (CT volumes, MedM-VL CT-Chest), both, or auto (slices when its connector is attn_pooling).")] = "auto",
    num_slices: Annotated[int, typer.Option("--num-slices", min=1, help="Slices per volume for --as slices (MedM-VL: 32).")] = 32,
    slice_pooling: Annotated[str, typer.Option("--slice-pooling", help="How --as slices pools over slices: concat (MedM-VL's code from its weights' release day, 5a90f80, on: one pooling over all slices' tokens) or mean (before it, 135db87: the connector per slice, outputs averaged). Recorded in the run's recipe.")] = "concat",
    dtype: Annotated[str | None, typer.Option("--dtype", help="Store weights as float32 | bfloat16 | float16 (default: as in SRC).")] = None,
    allow_approximate: Annotated[bool, typer.Option("--allow-approximate", help="Import settings medmvl can only approximate (SigLIP select_feature patch) instead of refusing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder at --out.")] = False,
) -> None:
    """A MedM-VL checkpoint folder -> a medmvl run folder (for infer, demo, export, init_from).

    The run keeps MedM-VL's prompt format and preprocessing and gives its logits (docs/interop.md).

    Examples:
      medmvl import medm-vl ckpts/MedM-VL-CT-Chest-3B-en --out runs/medmvl-ct-chest
      medmvl import medm-vl ckpts/MedM-VL-CT-3B-en --out runs/medmvl-ct
      medmvl import medm-vl ckpts/MedM-VL-2D-3B-en --out runs/medmvl-2d --image-encoder ckpts/siglip-base-patch16-256-multilingual
      medmvl import medm-vl ckpts/old-ct-over-slices --out runs/old-ct --as slices --slice-pooling mean
    """
    from medmvl_cli.interop.medm_vl.importer import import_medm_vl

    if branch not in BRANCHES:
        raise typer.BadParameter(f"use one of {', '.join(BRANCHES)}", param_hint="--as")
    if slice_pooling not in SLICE_POOLINGS:
        raise typer.BadParameter(f"use one of {', '.join(SLICE_POOLINGS)}", param_hint="--slice-pooling")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise typer.BadParameter("use float32, bfloat16 or float16", param_hint="--dtype")
    run = import_medm_vl(
        src, out, tokenizer_dir=tokenizer, llm_dir=llm, image_encoder_dir=image_encoder,
        image3d_encoder_dir=image3d_encoder, template=template, branch=branch, num_slices=num_slices,
        slice_pooling=slice_pooling,
        dtype=dtype, allow_approximate=allow_approximate, overwrite=overwrite,
    )
    typer.echo(str(run))
