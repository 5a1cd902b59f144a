"""Reading a MedM-VL checkpoint folder: its flat `lvlm_*` config, its weights, and the parts it
did not save (the LLM's and the encoders' configs, which MedM-VL re-reads from their original
folders at load time).

What `LVLMForConditionalGeneration.save_pretrained` writes (MSIIP/MedM-VL, lvlm/model/):

- `config.json`: `model_type: "lvlm"` and `lvlm_llm_type` (qwen2 | llama3 | llama | phi | phi3),
  `lvlm_llm_name_or_path`, `lvlm_llm_max_length`, `lvlm_llm_padding_side`,
  `lvlm_encoder_image_type` (clip | siglip), `lvlm_encoder_image_name_or_path`,
  `lvlm_encoder_image_select_layer`, `lvlm_encoder_image_select_feature` (patch | cls_patch),
  `lvlm_connector_image_type` (mlp | spatial_pooling | attn_pooling), `lvlm_connector_image_name`
  (`mlp2x_gelu`: depth 2, GELU) and the same with `image3d` (m3dclip | medmclip) — the code
  since 2025-10-10 (b1b0770);
- the code of the weights' release day (5a90f80, 2025-04-10, and before) wrote no `model_type`
  at all, the same fields without the `lvlm_` prefix, and nested the whole sub-configs
  (`llm_config`, `encoder_image_config` / `encoder_image3d_config` with `auto_map`,
  `connector_*_config`); `*_name_or_path` point at the authors' folders and hub ids. Both forms
  are read; the nested configs are enough, those paths are never needed.
- `model.safetensors` (or shards, or `pytorch_model.bin`): `llm.*`, `encoder_image.encoder.*`,
  `connector_image.*`, `encoder_image3d.encoder.*`, `connector_image3d.*`.
- the tokenizer files of the LLM.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medmvl_cli.errors import ModelError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Config fields that describe where a config came from, not the architecture.
PROVENANCE_KEYS = ("_name_or_path", "transformers_version", "architectures", "_attn_implementation_autoset",
                   "dtype", "torch_dtype", "auto_map")


@dataclass
class MedmVlCheckpoint:
    """A MedM-VL checkpoint folder: its config.json and (loaded on demand) its weights."""

    folder: Path
    config: dict[str, Any]
    _weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def get(self, name: str, default: Any = None) -> Any:
        """A MedM-VL setting by its name without the `lvlm_` prefix (either spelling is read)."""
        for key in (f"lvlm_{name}", name):
            if self.config.get(key) is not None:
                return self.config[key]
        return default

    def nested(self, *names: str) -> dict | None:
        """A sub-config MedM-VL nested in config.json (older checkpoints), if any."""
        for name in names:
            for key in (f"lvlm_{name}", name):
                value = self.config.get(key)
                if isinstance(value, dict) and value:
                    return value
        return None

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            from medmvl_cli.model.encoders.released_weights import read_state_dict

            self._weights, source = read_state_dict(self.folder, "MedM-VL checkpoint")
            logger.info("read %d tensors from %s", len(self._weights), source)
        return self._weights

    def has_tokenizer(self) -> bool:
        return has_tokenizer(self.folder)


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def read_checkpoint(folder: Path) -> MedmVlCheckpoint:
    """The checkpoint in `folder`; ModelError when it is not a MedM-VL one."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} is not a MedM-VL checkpoint folder (no config.json)",
                         hint="point at the folder MedM-VL's training wrote (output_dir)")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ModelError(f"{path} is not valid JSON ({err})") from None
    checkpoint = MedmVlCheckpoint(folder, config)
    if config.get("model_type") != "lvlm" and not is_release_day_layout(config):
        raise ModelError(
            f"{path} has model_type {config.get('model_type')!r}, not MedM-VL's 'lvlm' (nor the release-day layout: "
            "no model_type, an LVLMForConditionalGeneration with llm_type and llm_config)",
            hint="for a medmvl model use `medmvl export`; for a LLaVA folder use transformers directly",
        )
    if checkpoint.get("llm_type") is None:
        raise ModelError(f"{path} has no lvlm_llm_type", hint="the checkpoint's config.json is incomplete")
    return checkpoint


def is_release_day_layout(config: dict) -> bool:
    """The config.json MedM-VL's code wrote up to its release day (5a90f80, the published weights):
    its LVLMConfig had no model_type (so none is saved), unprefixed fields, nested sub-configs."""
    return (not config.get("model_type") and "LVLMForConditionalGeneration" in (config.get("architectures") or [])
            and config.get("llm_type") is not None)


def component_folder(name_or_path: str | None, given: Path | None, what: str, option: str) -> Path | None:
    """The folder a part's config is read from: the option, else `name_or_path` if it is local."""
    if given is not None:
        given = Path(given).expanduser()
        if not (given / "config.json").is_file():
            raise ModelError(f"{option} {given}: no config.json there", hint=f"point {option} at the {what} folder")
        return given
    if name_or_path and Path(name_or_path).expanduser().is_dir():
        return Path(name_or_path).expanduser()
    return None


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path} ({err})") from None


def llm_config(checkpoint: MedmVlCheckpoint, llm_dir: Path | None):
    """The LLM's transformers config: nested in config.json, or read from the LLM's folder."""
    from transformers import AutoConfig

    data = checkpoint.nested("llm_config", "text_config")
    if data is None:
        name = checkpoint.get("llm_name_or_path")
        folder = component_folder(name, llm_dir, "LLM", "--llm")
        if folder is None:
            raise ModelError(
                f"{checkpoint.folder}/config.json does not hold the LLM's architecture (MedM-VL re-reads it from "
                f"lvlm_llm_name_or_path = {name!r}, which is not a local folder)",
                hint="pass --llm DIR: the LLM folder MedM-VL was trained from (only its config.json is read)",
            )
        data = read_json(folder / "config.json")
    data = {k: v for k, v in data.items() if k not in PROVENANCE_KEYS}
    kind = data.pop("model_type", None)
    if kind is None:
        raise ModelError("the LLM's config has no model_type", hint="pass --llm DIR with the LLM's own config.json")
    try:
        return AutoConfig.for_model(kind, **data)
    except (ValueError, TypeError, KeyError) as err:
        raise ModelError(f"the LLM's config (model_type {kind!r}) cannot be read by transformers ({err})") from None


def vision_config(checkpoint: MedmVlCheckpoint, kind: str, encoder_dir: Path | None) -> tuple[dict, Path | None]:
    """(the CLIP / SigLIP vision config as a dict, the encoder folder or None) of the 2D encoder."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    folder = component_folder(checkpoint.get("encoder_image_name_or_path"), encoder_dir, "2D encoder", "--image-encoder")
    data = checkpoint.nested("encoder_image_config")
    if data is None:
        if folder is None:
            raise ModelError(
                f"{checkpoint.folder}/config.json does not hold the 2D encoder's architecture (MedM-VL re-reads it from "
                f"lvlm_encoder_image_name_or_path = {checkpoint.get('encoder_image_name_or_path')!r}, not a local folder)",
                hint="pass --image-encoder DIR: the CLIP / SigLIP folder MedM-VL was trained from (config.json, "
                     "preprocessor_config.json)",
            )
        data = read_json(folder / "config.json")
    data = dict(data.get("vision_config") or data)  # a whole CLIP / SigLIP config holds it nested
    config_cls = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    data.pop("model_type", None)
    config = config_cls(**{k: v for k, v in data.items() if k not in PROVENANCE_KEYS})
    return {k: v for k, v in config.to_dict().items() if k not in PROVENANCE_KEYS}, folder


def image3d_encoder_config(checkpoint: MedmVlCheckpoint, encoder_dir: Path | None) -> tuple[dict, Path | None]:
    """(the 3D encoder's released config.json as a dict, {} when absent; its folder or None)."""
    folder = component_folder(checkpoint.get("encoder_image3d_name_or_path"), encoder_dir, "3D encoder", "--image3d-encoder")
    data = checkpoint.nested("encoder_image3d_config")
    if data is None and folder is not None:
        data = read_json(folder / "config.json")
    if data is None:
        logger.warning("no config for the 3D encoder (%s): using its released default sizes",
                       checkpoint.get("encoder_image3d_name_or_path"))
    return dict(data or {}), folder
