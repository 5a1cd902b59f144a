"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Dotted KEY=VALUE overrides, values parsed as YAML: train.lr=1e-4 data.packing=true.", show_default=False),
]
StageOption = Annotated[
    Optional[str],
    typer.Option("--stage", help="Resolve for this stage (pretrain | finetune | lora); default: the recipe's, else finetune."),
]
