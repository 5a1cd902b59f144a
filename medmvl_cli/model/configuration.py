"""The composite config of a medmvl model: the LLM's config plus the two branches' architecture.

`config.json` of a saved model holds everything needed to rebuild the network with no path back
to the original folders:

- ``text_config``: the LLM's own config (any causal LM transformers knows);
- ``image`` / ``image3d``: ``{"encoder": arch, "connector": spec}`` where ``arch`` is the
  encoder's self-description (backend, select layer / feature, sizes, for CLIP / SigLIP the
  whole vision config and the image mean / std) and ``spec`` the connector's recipe section;
- ``image_token_id`` / ``image3d_token_id``: the placeholder ids; ``llm_adapter``: the subfolder
  of a PEFT adapter on the LLM, if any.

The data side (chat template, ``max_length``, DICOM window, volume preprocessing, tokens per
placeholder) is the processor's, in ``processor_config.json`` beside it
(`medmvl_cli.data.processor`); folders saved before that file existed kept those keys here.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The processor's file beside config.json (`medmvl_cli.data.processor.MedmvlProcessor`).
PROCESSOR_CONFIG = "processor_config.json"


class MedmvlConfig(PreTrainedConfig):
    """Config of `MedmvlForConditionalGeneration` (model_type ``medmvl``)."""

    model_type = "medmvl"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: Any | None = None
    image: dict | None = None
    image3d: dict | None = None
    image_token_id: int | None = None
    image3d_token_id: int | None = None
    llm_adapter: str | None = None

    def branch(self, name: str) -> dict | None:
        """The settings of branch ``image`` or ``image3d`` (None when the model lacks it)."""
        return self.image if name == "image" else self.image3d


def register() -> None:
    """Make `AutoConfig` know ``medmvl`` (for tools that read config.json generically)."""
    try:
        AutoConfig.register(MedmvlConfig.model_type, MedmvlConfig)
    except ValueError:
        pass  # already registered
