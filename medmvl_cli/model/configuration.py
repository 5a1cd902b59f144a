"""The composite config of a medmvl model: the LLM's config plus the two branches' settings.

`config.json` of a saved model holds everything needed to rebuild it with no path back to the
original folders:

- ``text_config``: the LLM's own config (any causal LM transformers knows);
- ``image`` / ``image3d``: ``{"encoder": arch, "connector": spec, ...}`` where ``arch`` is the
  encoder's self-description (backend, select layer / feature, sizes, for CLIP / SigLIP the
  whole vision config and the image mean / std) and ``spec`` the connector's recipe section;
  ``image3d`` also holds ``volume`` (the preprocessing: size, HU window, spacing, orientation, ...)
  and ``image`` the optional DICOM ``window``;
- ``image_token_id`` / ``image3d_token_id``: the placeholder ids, ``template``: the chat template
  name, ``max_length``; ``llm_adapter``: the subfolder of a PEFT adapter on the LLM, if any.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class MedmvlConfig(PreTrainedConfig):
    """Config of `MedmvlForConditionalGeneration` (model_type ``medmvl``)."""

    model_type = "medmvl"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: Optional[Any] = None
    image: Optional[dict] = None
    image3d: Optional[dict] = None
    image_token_id: Optional[int] = None
    image3d_token_id: Optional[int] = None
    template: Optional[str] = None
    max_length: int = 2048
    llm_adapter: Optional[str] = None

    def branch(self, name: str) -> Optional[dict]:
        """The settings of branch ``image`` or ``image3d`` (None when the model lacks it)."""
        return self.image if name == "image" else self.image3d


def register() -> None:
    """Make `AutoConfig` know ``medmvl`` (for tools that read config.json generically)."""
    try:
        AutoConfig.register(MedmvlConfig.model_type, MedmvlConfig)
    except ValueError:
        pass  # already registered
