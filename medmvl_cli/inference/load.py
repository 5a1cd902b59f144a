"""A saved model and its processor, loaded together (`medmvl_cli.load`)."""

from __future__ import annotations

from pathlib import Path


def load(folder: str | Path, *, dtype: str | None = "auto", device: str | None = "auto",
         merge_lora: bool = True, attn_implementation: str = "sdpa"):
    """(model, processor) from a model folder written by medmvl (`runs/NAME/model`, an export of it,
    or the run folder `runs/NAME` itself).

    ``dtype``: "auto" keeps the saved dtype; ``device``: "auto" is the GPU where there is one, None
    leaves the model on the CPU; ``merge_lora``: a LoRA adapter is merged into the LLM (as LLaVA's
    loader does: the adapter's answers at the plain model's speed). The model comes back in eval
    mode. Raises ModelError when the processor's token counts do not fit the model."""
    import torch

    from medmvl_cli.data.processor import MedmvlProcessor
    from medmvl_cli.model.builder import load_model

    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "model" / "config.json").is_file():
        folder = folder / "model"
    model = load_model(folder, dtype=dtype, attn_implementation=attn_implementation, merge_lora=merge_lora)
    processor = MedmvlProcessor.from_pretrained(folder)
    processor.check_model(model, folder)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None
    if device is not None:
        model.to(device)
    return model.eval(), processor


def build(recipe, *, dtype=None):
    """(model, processor) of the model a resolved recipe describes, untrained (or `init_from`'s
    weights): what a training run starts from, and what tests and benchmarks save and load."""
    from medmvl_cli.data.processor import MedmvlProcessor
    from medmvl_cli.model.builder import build_model
    from medmvl_cli.model.token_counts import placeholder_lengths

    model, tokenizer, image_processor = build_model(recipe, dtype=dtype)
    return model, MedmvlProcessor.from_recipe(recipe, placeholder_lengths(model), tokenizer, image_processor)
