"""The assembled model: encoders -> connectors -> a causal LLM, merged at placeholder tokens.

Text and features meet in `embed_inputs`: the LLM embeds `input_ids`, each branch encodes all of
its images / volumes of the batch in one call, and one `masked_scatter` per branch writes the
features over that branch's placeholder tokens (`<image>` / `<image3d>`, already expanded to
`num_tokens(branch)` ids each by the data side). Counts are checked before the encoder runs; no
per-sample loop, no re-padding: sequences arrive at their final length.

Submodules (and the key prefixes in the saved safetensors): `llm`, `image_encoder`,
`image_connector`, `image3d_encoder`, `image3d_connector`.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from medmvl_cli.constants import BRANCH_PLACEHOLDERS, IGNORE_INDEX
from medmvl_cli.errors import ModelError
from medmvl_cli.model.configuration import MedmvlConfig
from medmvl_cli.model.connectors import build_connector
from medmvl_cli.model.encoders import Encoder, encoder_from_arch
from medmvl_cli.model.llm import encoder_attn_implementation, is_peft_model

logger = logging.getLogger(__name__)

BRANCHES = ("image", "image3d")
COMPONENTS = ("llm", "image_encoder", "image_connector", "image3d_encoder", "image3d_connector")
ADAPTER_DIR = "llm_adapter"
_LORA_KEY = re.compile(r"(^|\.)lora_[^.]*(\.|$)")


class MedmvlPreTrainedModel(PreTrainedModel):
    config_class = MedmvlConfig
    base_model_prefix = "medmvl"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module: nn.Module) -> None:
        # Only medmvl's own modules land here (connectors, 3D encoders); the LLM and the HF
        # vision towers are PreTrainedModels and initialise themselves. A module with an
        # `init_own_weights(std)` method initialises what only it knows about.
        std = 0.02
        if isinstance(module, nn.Linear):
            # PyTorch's fan-in scaled default, as LLaVA's projector gets: a fixed std of 0.02 shrinks
            # narrow layers' outputs (a 64-wide 2-layer connector by ~40x), drowning the image signal
            # among the text embeddings.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            init.xavier_uniform_(module.in_proj_weight)
            if module.in_proj_bias is not None:
                init.zeros_(module.in_proj_bias)
        elif hasattr(module, "init_own_weights"):
            # An encoder or connector with parameters of its own (a query, position embeddings)
            # or its own init scheme; it runs after its children's init above.
            module.init_own_weights(std)


class MedmvlForConditionalGeneration(MedmvlPreTrainedModel):
    """Encoders + connectors + causal LLM. Build with `medmvl_cli.model.builder.build_model`,
    load with `load_model` / `from_pretrained`."""

    def __init__(
        self,
        config: MedmvlConfig,
        llm: nn.Module | None = None,
        image_encoder: Encoder | None = None,
        image3d_encoder: Encoder | None = None,
    ):
        super().__init__(config)
        if llm is None:
            from transformers import AutoModelForCausalLM

            llm = AutoModelForCausalLM.from_config(config.text_config)
        else:
            config.text_config = llm.config
        self.llm = llm
        attn = encoder_attn_implementation(getattr(config.text_config, "_attn_implementation", None) or "sdpa")
        given = {"image": image_encoder, "image3d": image3d_encoder}
        for branch in BRANCHES:
            settings = config.branch(branch)
            encoder = connector = None
            if settings is not None:
                encoder = given[branch] or encoder_from_arch(settings["encoder"], attn_implementation=attn)
                connector = build_connector(
                    settings["connector"], encoder.layout, encoder.width, config.text_config.hidden_size
                )
            setattr(self, f"{branch}_encoder", encoder)
            setattr(self, f"{branch}_connector", connector)
        self.post_init()

    # ------------------------------------------------------------------------------ structure
    def components(self) -> OrderedDict[str, nn.Module]:
        """name -> module for llm, image_encoder, image_connector, image3d_encoder, image3d_connector
        (absent branches omitted)."""
        parts = OrderedDict()
        for name in COMPONENTS:
            module = getattr(self, name, None)
            if module is not None:
                parts[name] = module
        return parts

    def num_tokens(self, branch: str) -> int:
        """LLM tokens one image (`image`) or one volume (`image3d`) becomes: the number of
        placeholder ids the data side writes for each `<image>` / `<image3d>`."""
        if branch not in BRANCHES:
            raise ModelError(f"unknown branch {branch!r}", hint="use image or image3d")
        connector = getattr(self, f"{branch}_connector")
        if connector is None:
            raise ModelError(f"the model has no {branch} branch", hint=f"add model.{branch} to the recipe")
        return connector.num_tokens

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.llm.get_output_embeddings()

    # ------------------------------------------------------------------------------ features
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_tokens("image"), llm_width)."""
        if self.image_encoder is None:
            raise ModelError("images given but the model has no 2D (`image`) branch", hint="add model.image to the recipe")
        return self.image_connector(self.image_encoder(pixel_values))

    def encode_volumes(self, volumes: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) in [0, 1] -> (N, num_tokens("image3d"), llm_width)."""
        if self.image3d_encoder is None:
            raise ModelError("volumes given but the model has no 3D (`image3d`) branch", hint="add model.image3d to the recipe")
        return self.image3d_connector(self.image3d_encoder(volumes))

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: positions of any placeholder token."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in (self.config.image_token_id, self.config.image3d_token_id):
            if token_id is not None:
                mask |= input_ids == token_id
        return mask

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        volumes: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        volume_embeds: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) ids (+ media) -> (B, L, llm_width) embeddings with features at the placeholders.

        `pixel_values` (N_images, 3, H, W) and `volumes` (N_volumes, 1, D, H, W) hold every image /
        volume of the batch in placeholder order (row-major over the batch); `image_embeds` /
        `volume_embeds` take `encode_images` / `encode_volumes` outputs computed earlier instead.
        """
        if inputs_embeds is None:
            inputs_embeds = self.llm.get_input_embeddings()(input_ids)
        branches = (
            ("image", self.config.image_token_id, pixel_values, image_embeds, self.encode_images),
            ("image3d", self.config.image3d_token_id, volumes, volume_embeds, self.encode_volumes),
        )
        for branch, token_id, media, embeds, encode in branches:
            mask = (input_ids == token_id) if token_id is not None else None
            n_tokens = int(mask.sum()) if mask is not None else 0  # the one host sync per branch
            source = embeds if embeds is not None else media
            if source is None:
                n_items, n_features = 0, 0
            else:
                n_items = source.shape[0]
                per_item = embeds.shape[1] if embeds is not None else self.num_tokens(branch)
                n_features = n_items * per_item
            if n_tokens != n_features:
                token = BRANCH_PLACEHOLDERS[branch]
                raise ModelError(
                    f"{branch} placeholders and features disagree: {n_tokens} {token} tokens in input_ids but "
                    f"{n_items} {'images' if branch == 'image' else 'volumes'} give {n_features} feature tokens",
                    hint=f"each {token} must be expanded to num_tokens('{branch}') ids and every item passed once",
                )
            if n_features == 0:
                continue
            features = embeds if embeds is not None else encode(media)
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), features.to(inputs_embeds.dtype))
        return inputs_embeds

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        volumes: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        volume_embeds: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        """input_ids (B, L) with expanded placeholders -> the LLM's CausalLMOutputWithPast
        (logits (B, L, vocab); loss when `labels` (B, L) is given, placeholders never count)."""
        if input_ids is not None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, volumes, image_embeds, volume_embeds, inputs_embeds)
            if labels is not None:
                labels = labels.masked_fill(self.placeholder_mask(input_ids), IGNORE_INDEX)
        elif any(x is not None for x in (pixel_values, volumes, image_embeds, volume_embeds)):
            raise ModelError("images or volumes given without input_ids", hint="pass input_ids holding the placeholders")
        elif inputs_embeds is None:
            raise ModelError("forward needs input_ids or inputs_embeds")
        # No KV cache unless asked: forward serves training and scoring (generate has its own
        # path), and with packed sequences (position_ids restarting at 0) a cache would let the
        # samples attend to each other.
        return self.llm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            labels=labels, use_cache=bool(use_cache), **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        volumes: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        volume_embeds: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **generation_kwargs,
    ) -> torch.LongTensor:
        """Prompt ids (B, L), left-padded for batches -> (B, new) generated ids (the prompt is not
        repeated, as with any `generate(inputs_embeds=...)`). Features are computed once; the LLM
        decodes with its KV cache (greedy, sampling or beam search as `generation_kwargs` say).
        `inputs_embeds` (B, L, width) from `embed_inputs` may stand for the ids and media; with a
        `cache` from `prefill` holding the first P positions, only positions P.. of it are computed."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, volumes, image_embeds, volume_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        generation_kwargs.setdefault("use_cache", True)
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generation_kwargs)

    @torch.no_grad()
    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
        """(G, P, width) prompt prefixes, left-padded, and their (G, P) mask -> a DynamicCache of
        their keys and values, at the positions `generate` gives them (counted over unmasked
        tokens). Runs the LLM's decoder only: no logits are needed for a prefix."""
        from transformers import DynamicCache

        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        cache = DynamicCache(config=self.llm.config)
        self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               position_ids=position_ids, cache=cache, use_cache=True)
        return cache

    # ------------------------------------------------------------------------------ save / load
    @staticmethod
    def _plain_key(key: str) -> str | None:
        """A state-dict key under the un-wrapped LLM's name; None for LoRA adapter tensors."""
        if not key.startswith("llm."):
            return key
        inner = key[len("llm."):].removeprefix("base_model.model.")
        if _LORA_KEY.search(inner):
            return None
        return "llm." + inner.replace(".base_layer.", ".")

    def _state_dict_without_adapter(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """The weights with the LoRA-wrapped LLM's base weights under their plain names."""
        state = self.state_dict() if state is None else state
        plain = {}
        for key, value in state.items():
            name = self._plain_key(key)
            if name is not None:
                plain[name] = value
        return plain

    def save_pretrained(self, save_directory, *args, **kwargs):
        """config.json + safetensors (sharded by `max_shard_size`); a LoRA-wrapped LLM saves its
        base weights here and the adapter in `llm_adapter/` (PEFT format)."""
        save_directory = Path(save_directory)
        if not is_peft_model(self.llm):
            self.config.llm_adapter = None
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.config.llm_adapter = ADAPTER_DIR
        kwargs["state_dict"] = self._state_dict_without_adapter(kwargs.get("state_dict"))
        result = super().save_pretrained(save_directory, *args, **kwargs)
        self.llm.save_pretrained(str(save_directory / ADAPTER_DIR))
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, adapter_trainable: bool = False, **kwargs):
        """Load a saved folder; an `llm_adapter/` is put back on the LLM (trainable if asked)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        adapter = model.config.llm_adapter
        if adapter:
            from peft import PeftModel

            folder = Path(pretrained_model_name_or_path) / adapter
            if not (folder / "adapter_config.json").is_file():
                raise ModelError(
                    f"{pretrained_model_name_or_path}: config.json names a LoRA adapter but {folder} has none",
                    hint="the model folder is incomplete; save it again",
                )
            model.llm = PeftModel.from_pretrained(model.llm, str(folder), is_trainable=adapter_trainable)
        return model
