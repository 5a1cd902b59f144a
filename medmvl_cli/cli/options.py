"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medmvl_cli.data.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted KEY=VALUE overrides, values parsed as YAML: train.lr=1e-4 data.packing=true.", show_default=False),
]
StageOption = Annotated[
    str | None,
    typer.Option("--stage", help="Resolve for this stage (pretrain | finetune | lora); default: the recipe's, else finetune."),
]
LIMITS = "Input limits (checked from file headers, before decoding)"
MaxVoxelsOption = Annotated[
    int | None,
    typer.Option("--max-voxels", min=1, rich_help_panel=LIMITS, show_default=False,
                 help=f"Refuse a volume whose header declares more voxels (default 512 x 512 x 2048 = "
                      f"{DEFAULT_MAX_VOXELS:,}, or a --recipe's data.max_voxels)."),
]
MaxPixelsOption = Annotated[
    int | None,
    typer.Option("--max-pixels", min=1, rich_help_panel=LIMITS, show_default=False,
                 help=f"Refuse a 2D image whose header declares more pixels (default {DEFAULT_MAX_PIXELS:,}, "
                      "PIL's decompression-bomb limit, or a --recipe's data.max_pixels)."),
]


def limit_options(max_voxels: int | None, max_pixels: int | None) -> dict[str, int]:
    """`--max-voxels` / `--max-pixels` as reader keyword arguments, defaults filled in."""
    return {"max_voxels": max_voxels or DEFAULT_MAX_VOXELS, "max_pixels": max_pixels or DEFAULT_MAX_PIXELS}
