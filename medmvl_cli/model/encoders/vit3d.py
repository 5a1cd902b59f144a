"""`vit3d`: a 3D ViT from MONAI blocks, random-init or from a folder saved by `save_pretrained`.

Input: volumes (N, 1, D, H, W) in [0, 1] (the data side's HU window), at exactly `volume.size`,
centred to [-1, 1] inside (`input_norm`, see `INPUT_NORM`).
Tokens: (D/pd)·(H/ph)·(W/pw) patches in (d, h, w) row-major order, plus the CLS token with
`select_feature: cls_patch`. `select_layer` 0 is the patch embeddings (position embedding added);
blocks after the selected one are not run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from medmvl_cli.errors import ModelError
from medmvl_cli.model.encoders.monai_vit3d_module import MonaiViT3d
from medmvl_cli.model.encoders.released_weights import read_config
from medmvl_cli.model.encoders.volume_vit_base import VolumeViTEncoder, check_patch_grid

logger = logging.getLogger(__name__)

DEFAULTS = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "patch_size": (4, 16, 16)}
ARCH_KEYS = ("img_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "cls_token", "in_channels",
             "input_norm")
# (mean, std) taken off the [0, 1] volumes before the patch embedding (SigLIP's 0.5 / 0.5: [-1, 1]).
# On raw [0, 1] input every uniform patch (air, lung, soft tissue, consolidation) embeds along the one
# direction W·1, scaled by its intensity; the blocks' LayerNorms divide that scale out, so the
# intensity, which is what tells a consolidated lung from an aerated one, barely reaches the features.
# Centred, dark and bright patches point in opposite directions. Saved models without the key
# (written before it existed) keep raw input.
INPUT_NORM = [0.5, 0.5]


def checked_input_norm(value: Any) -> list[float] | None:
    """`input_norm` as a config (a saved model's, a folder's) gives it: None or [mean, std > 0]."""
    if value is None:
        return None
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not numbers or value[1] <= 0:
        raise ModelError(
            f"vit3d encoder: input_norm {value!r} in its config is not [mean, std] with a positive std",
            hint="the folder's config.json is damaged; save the encoder again, or remove the key for raw [0, 1] input",
        )
    return [float(value[0]), float(value[1])]


class Vit3dEncoder(VolumeViTEncoder):
    type: ClassVar[str] = "vit3d"

    def __init__(self, arch: dict[str, Any], attn_implementation: str = "sdpa"):
        has_cls = arch.get("cls_token", True)
        vit = MonaiViT3d(
            img_size=tuple(arch["img_size"]), patch_size=tuple(arch["patch_size"]), hidden_size=arch["hidden_size"],
            mlp_dim=arch["mlp_dim"], num_layers=arch["num_layers"], num_heads=arch["num_heads"],
            in_channels=arch.get("in_channels", 1), cls_token=has_cls,
        )
        super().__init__(arch, vit, has_cls=has_cls)
        self.input_norm = checked_input_norm(arch.get("input_norm"))

    def normalize(self, volumes: torch.Tensor) -> torch.Tensor:
        volumes = super().normalize(volumes)
        if self.input_norm is None:
            return volumes
        mean, std = self.input_norm
        return (volumes - mean) / std

    @classmethod
    def from_recipe(cls, cfg: Any, volume: Any | None = None, attn_implementation: str = "sdpa") -> Vit3dEncoder:
        from medmvl_cli.model.presets.models import VIT3D_PRESETS

        size = tuple(volume.size) if volume is not None else (32, 256, 256)
        base: dict[str, Any] = dict(DEFAULTS)
        saved: dict[str, Any] = {}
        if cfg.preset is not None:
            base.update(VIT3D_PRESETS[cfg.preset])
        if cfg.path is not None:
            saved = read_config(Path(cfg.path))
            base.update({k: saved[k] for k in ARCH_KEYS if k in saved})
        for key in ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
            if getattr(cfg, key) is not None:
                base[key] = getattr(cfg, key)
        base.setdefault("mlp_dim", 4 * base["hidden_size"])
        if base["hidden_size"] % base["num_heads"]:
            raise ModelError(
                f"vit3d encoder: hidden_size {base['hidden_size']} is not a multiple of num_heads {base['num_heads']}",
                hint="make model.image3d.encoder.hidden_size divisible by num_heads",
            )
        if saved and tuple(saved.get("img_size", size)) != size:
            raise ModelError(
                f"vit3d encoder: {cfg.path} was trained on volumes of {saved['img_size']} but model.image3d.volume.size is {list(size)}",
                hint=f"set model.image3d.volume.size to {saved['img_size']}",
            )
        check_patch_grid(size, base["patch_size"], "vit3d encoder")
        arch = {
            "type": cls.type, "select_layer": cfg.select_layer, "select_feature": cfg.select_feature,
            "img_size": list(size), "patch_size": list(base["patch_size"]), "hidden_size": base["hidden_size"],
            "num_layers": base["num_layers"], "num_heads": base["num_heads"], "mlp_dim": base["mlp_dim"],
            "cls_token": bool(base.get("cls_token", True)), "in_channels": int(base.get("in_channels", 1)),
            # A folder keeps the input its weights were trained on; a random init is centred.
            "input_norm": saved.get("input_norm") if cfg.path is not None else INPUT_NORM,
        }
        encoder = cls(arch)
        return encoder.load_released(Path(cfg.path), prefix="") if cfg.path is not None else encoder

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json + model.safetensors, a folder `path` can point at later."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({k: self.arch.get(k) for k in ARCH_KEYS}, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.vit.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        return folder
