"""How many LLM tokens one `<image>` / `<image3d>` placeholder expands to, read off a model.

The counts are derived from each branch's encoder and connector, never copied: from a model in
memory (`placeholder_lengths`), from a recipe with the encoders and connectors built on the meta
device, no weights read or allocated (`placeholder_lengths_for_recipe`, for `data validate
--recipe`), or from a saved config (`placeholder_lengths_for_config`).
"""

from __future__ import annotations

from typing import Any

from medmvl_cli.constants import BRANCH_PLACEHOLDERS


def placeholder_lengths(model) -> dict[str, int]:
    """Tokens per `<image>` / `<image3d>` of the model's branches, e.g. {"<image>": 16}."""
    return {placeholder: model.num_tokens(branch) for branch, placeholder in BRANCH_PLACEHOLDERS.items()
            if model.config.branch(branch) is not None}


def placeholder_lengths_for_recipe(recipe: Any) -> dict[str, int]:
    """The token counts of the model a validated recipe describes: each branch's encoder and
    connector built on the meta device from the folders' configs (no weights read, nothing
    allocated; the LLM plays no part in the counts). With `init_from`, the earlier model's."""
    import torch

    from medmvl_cli.model.builder import materialise_presets
    from medmvl_cli.model.connectors import build_connector
    from medmvl_cli.model.encoders import encoder_from_recipe
    from medmvl_cli.model.weight_files import architecture_only

    if getattr(recipe, "init_from", None):
        return placeholder_lengths_for_config(_earlier_config(recipe.init_from))
    materialise_presets(recipe)  # a preset's folder is written once, outside the meta device
    counts = {}
    with torch.device("meta"), architecture_only():
        for branch, placeholder in BRANCH_PLACEHOLDERS.items():
            spec = getattr(recipe.model, branch)
            if spec is None:
                continue
            encoder = encoder_from_recipe(spec.encoder, volume=getattr(spec, "volume", None))
            connector = build_connector(spec.connector.model_dump(mode="json"), encoder.layout, encoder.width,
                                        encoder.width)
            counts[placeholder] = connector.num_tokens
    return counts


def _earlier_config(init_from: str):
    from pathlib import Path

    from medmvl_cli.errors import ModelError
    from medmvl_cli.model.configuration import MedmvlConfig, register

    source = Path(init_from)
    folder = source / "model" if (source / "model" / "config.json").is_file() else source
    if not (folder / "config.json").is_file():
        raise ModelError(f"init_from: {source} holds no model (neither {source}/model/config.json nor "
                         f"{source}/config.json)", hint="run the earlier stage first, or fix init_from")
    register()
    return MedmvlConfig.from_pretrained(str(folder))


def placeholder_lengths_for_config(config) -> dict[str, int]:
    """The token counts of a saved model's config (a `MedmvlConfig`), its architecture built on the
    meta device (for model folders written before `processor_config.json` held them)."""
    import torch

    from medmvl_cli.model.lvlm import MedmvlForConditionalGeneration

    with torch.device("meta"):
        model = MedmvlForConditionalGeneration(config)
    return placeholder_lengths(model)
