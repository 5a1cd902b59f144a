"""Shared code of the 2D encoders that are transformers vision towers (CLIP, SigLIP).

Features follow LLaVA: the tower runs with `output_hidden_states=True`, `select_layer` indexes
those hidden states (0 = the embeddings, -1 = the last layer, -2 = the one before, as in LLaVA's
`mm_vision_select_layer`), and `select_feature: patch` drops CLIP's CLS token at position 0.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any, ClassVar

import torch

from medmvl_cli.errors import ModelError
from medmvl_cli.model.encoders.base import Encoder, TokenLayout, check_select_layer
from medmvl_cli.model.weight_files import check_safetensors, reads_weights

logger = logging.getLogger(__name__)

# Config fields that describe where a config came from, not the architecture.
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version", "architectures", "_attn_implementation_autoset", "dtype")


def tower_folder(cfg: Any) -> str:
    """The folder (or hub id) of a clip / siglip / slices encoder section: its path or its preset."""
    if getattr(cfg, "preset", None) is not None:
        from medmvl_cli.model.presets.models import encoder_preset_dir

        kind = getattr(cfg, "base", None) or cfg.type
        return str(encoder_preset_dir(kind))
    return str(cfg.path)


class HFVisionTower(Encoder):
    """A transformers vision model whose hidden states are the features. Input: (N, 3, H, W)."""

    has_cls: ClassVar[bool] = True

    @staticmethod
    @abstractmethod
    def _classes():  # (config class, model class, image processor class)
        ...

    def __init__(self, arch: dict[str, Any], tower: torch.nn.Module | None = None, attn_implementation: str = "sdpa"):
        super().__init__(arch)
        config_cls, model_cls, _ = self._classes()
        if tower is None:
            config = config_cls(**arch["vision_config"])
            tower = model_cls._from_config(config, attn_implementation=attn_implementation)
        self.tower = tower
        config = tower.config
        self.image_size: int = int(config.image_size)
        side = config.image_size // config.patch_size
        self.select_layer = check_select_layer(
            int(arch["select_layer"]), config.num_hidden_layers + 1, f"{self.type} encoder"
        )
        self.include_cls = self.has_cls and arch["select_feature"] == "cls_patch"
        self.width = int(config.hidden_size)
        self.layout = TokenLayout((side, side), 1 if self.include_cls else 0)
        self.image_mean = tuple(arch["image_mean"])
        self.image_std = tuple(arch["image_std"])

    @classmethod
    def _after_load(cls, tower: torch.nn.Module) -> None:
        """Drop what the features never pass through (SigLIP's pooling head)."""

    @classmethod
    def from_recipe(cls, cfg: Any, volume: Any | None = None, attn_implementation: str = "sdpa") -> HFVisionTower:
        folder = tower_folder(cfg)
        config_cls, model_cls, _ = cls._classes()
        from transformers.utils import logging as hf_logging

        check_safetensors(folder, f"{cls.type} encoder", hint="restore the encoder folder (download or copy it again)")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # our own key report below replaces transformers' table
        try:
            config = config_cls.from_pretrained(folder)
            if reads_weights():
                tower, info = model_cls.from_pretrained(
                    folder, config=config, attn_implementation=attn_implementation, output_loading_info=True
                )
            else:  # shapes only (`architecture_only`)
                tower, info = model_cls._from_config(config, attn_implementation=attn_implementation), None
        except (OSError, ValueError) as err:
            raise ModelError(
                f"{cls.type} encoder: cannot load a {model_cls.__name__} from {folder} ({err})",
                hint=f"point `path` at a local folder holding a {cls.type.upper()} model (config.json + weights)",
            ) from None
        finally:
            hf_logging.set_verbosity(verbosity)
        if info is not None:
            check_loading_info(cls.type, folder, info)
        cls._after_load(tower)
        processor = load_image_processor(folder, cls, int(config.image_size))
        arch = cls.make_arch(cfg, tower, processor)
        encoder = cls(arch, tower=tower, attn_implementation=attn_implementation)
        encoder.image_processor = processor  # a plain attribute: the builder hands it to the data side
        return encoder

    @classmethod
    def make_arch(cls, cfg: Any, tower: torch.nn.Module, processor: Any) -> dict[str, Any]:
        if cfg.select_feature == "cls_patch" and not cls.has_cls:
            logger.info("%s has no CLS token: select_feature cls_patch gives the patch tokens only", cls.type)
        vision_config = {k: v for k, v in tower.config.to_dict().items() if k not in _PROVENANCE_KEYS}
        return {
            "type": cls.type,
            "select_layer": cfg.select_layer,
            "select_feature": cfg.select_feature,
            "vision_config": vision_config,
            "image_mean": [float(v) for v in processor.image_mean],
            "image_std": [float(v) for v in processor.image_std],
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, T, width) features."""
        out = self.tower(pixel_values=pixel_values.to(self.tower.dtype), output_hidden_states=True)
        features = out.hidden_states[self.select_layer]
        if self.has_cls and not self.include_cls:
            features = features[:, 1:]
        return features


# Keys of a whole CLIP / SigLIP checkpoint that belong to its text side or contrastive loss.
_NON_VISION_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def check_loading_info(kind: str, folder: str, info: dict) -> None:
    """A vision weight missing from the folder is an error (never a silent random init); the text
    tower of a whole CLIP / SigLIP checkpoint is dropped quietly, anything else is reported."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ModelError(
            f"{kind} encoder: {folder} lacks vision weights: {shown}",
            hint="point `path` at the released checkpoint (its vision tower must be complete)",
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    other = [k for k in unexpected if not k.startswith(_NON_VISION_PREFIXES)]
    if other:
        logger.warning("%s encoder: ignored %d weights of %s that fit no vision layer: %s",
                       kind, len(other), folder, ", ".join(other[:8]))
    if len(unexpected) > len(other):
        logger.info("%s encoder: dropped the %d text-tower weights of %s", kind, len(unexpected) - len(other), folder)


def load_image_processor(folder: str, tower_cls: type[HFVisionTower], image_size: int):
    """The folder's image processor, or the backend's default one at the tower's image size."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError):
        _, _, processor_cls = tower_cls._classes()
        logger.warning("no image processor in %s: using %s defaults at %d px", folder, processor_cls.__name__, image_size)
        return default_image_processor(tower_cls.type, image_size)


def default_image_processor(kind: str, image_size: int):
    """A CLIP / SigLIP image processor at `image_size` with the backend's usual mean and std."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if kind == "clip":
        return CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    return SiglipImageProcessor(size={"height": image_size, "width": image_size})


def image_processor_from_arch(arch: dict[str, Any]):
    """Rebuild the 2D branch's image processor from a saved encoder arch (when the folder lacks it)."""
    size = int(arch["vision_config"]["image_size"])
    processor = default_image_processor(arch["type"], size)
    processor.image_mean = list(arch["image_mean"])
    processor.image_std = list(arch["image_std"])
    return processor
