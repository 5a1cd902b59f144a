"""The model: vision encoders -> connectors -> a causal LLM (MedM-VL / TinyLLaVA / LLaVA style).

- `encoders/`: one backend per file, a registry by `type` (clip, siglip, vit3d, m3d_clip,
  medm_clip, slices); each exposes its width, token layout and an `arch` to rebuild it.
- `connectors/`: mlp, spatial_pooling, attention_pooling; sizes derived from encoder and LLM.
- `lvlm.py`: `MedmvlForConditionalGeneration` (a transformers PreTrainedModel), one masked
  scatter per branch; `configuration.py`: its composite config.
- `builder.py`: `build_model(recipe)`, `save_model`, `load_model`.
- `trainable.py`: `apply_trainable`, `apply_lora`, `parameter_counts`.
- `presets/`: tiny random-init models and the tokenizers that ship with the package.

See docs/model.md.
"""

_BUILDER = ("build_model", "load_model", "save_model")


def __getattr__(name: str):
    """`from medmvl_cli.model import load_model` (and build_model, save_model), imported on first use
    so that importing a submodule does not pull the builder's dependencies."""
    if name in _BUILDER:
        from medmvl_cli.model import builder

        return getattr(builder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
