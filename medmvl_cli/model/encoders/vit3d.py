"""`vit3d`: a 3D ViT from MONAI blocks, random-init or from a folder saved by `save_pretrained`.

Input: volumes (N, 1, D, H, W) in [0, 1] (the data side's HU window), at exactly `volume.size`.
Tokens: (D/pd)·(H/ph)·(W/pw) patches in (d, h, w) row-major order, plus the CLS token with
`select_feature: cls_patch`. `select_layer` 0 is the patch embeddings (position embedding added);
blocks after the selected one are not run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from medmvl_cli.errors import ModelError
from medmvl_cli.model.encoders.base import Encoder, TokenLayout, check_select_layer, mark_loaded
from medmvl_cli.model.encoders.monai_vit import MonaiViT3d
from medmvl_cli.model.encoders.released import load_vision_weights, read_config, read_state_dict

logger = logging.getLogger(__name__)

DEFAULTS = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "patch_size": (4, 16, 16)}
ARCH_KEYS = ("img_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "cls_token", "in_channels")


def check_patch_grid(img_size, patch_size, what: str) -> None:
    bad = [f"{s} / {p}" for s, p in zip(img_size, patch_size) if s % p or s < p]
    if bad:
        raise ModelError(
            f"{what}: patch size {list(patch_size)} does not divide the volume size {list(img_size)} ({', '.join(bad)})",
            hint="choose model.image3d.volume.size as a multiple of the encoder's patch size on every axis",
        )


def check_volume_shape(volumes: torch.Tensor, img_size, what: str) -> None:
    if volumes.dim() != 5 or tuple(volumes.shape[2:]) != tuple(img_size) or volumes.shape[1] != 1:
        raise ModelError(
            f"{what}: volumes of shape {tuple(volumes.shape)} given; the encoder takes (N, 1, {', '.join(map(str, img_size))})",
            hint="preprocess volumes to model.image3d.volume.size",
        )


class Vit3dEncoder(Encoder):
    type: ClassVar[str] = "vit3d"
    modality: ClassVar[str] = "volume"

    def __init__(self, arch: dict[str, Any], attn_implementation: str = "sdpa"):
        super().__init__(arch)
        self.img_size = tuple(arch["img_size"])
        self.vit = MonaiViT3d(
            img_size=self.img_size, patch_size=tuple(arch["patch_size"]), hidden_size=arch["hidden_size"],
            mlp_dim=arch["mlp_dim"], num_layers=arch["num_layers"], num_heads=arch["num_heads"],
            in_channels=arch.get("in_channels", 1), cls_token=arch.get("cls_token", True),
        )
        self.select_layer = check_select_layer(arch["select_layer"], arch["num_layers"] + 1, f"{self.type} encoder")
        self.include_cls = arch.get("cls_token", True) and arch["select_feature"] == "cls_patch"
        self.has_cls = arch.get("cls_token", True)
        self.width = arch["hidden_size"]
        self.layout = TokenLayout(self.vit.grid, 1 if self.include_cls else 0)

    @classmethod
    def from_recipe(cls, cfg: Any, volume: Optional[Any] = None, attn_implementation: str = "sdpa") -> "Vit3dEncoder":
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
        }
        encoder = cls(arch)
        if cfg.path is not None:
            state, source = read_state_dict(Path(cfg.path), "vit3d encoder")
            load_vision_weights(encoder.vit, state, source=source, what="vit3d encoder", prefix="")
            mark_loaded(encoder)
        return encoder

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json + model.safetensors, a folder `path` can point at later."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({k: self.arch[k] for k in ARCH_KEYS}, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.vit.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        return folder

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) in [0, 1] -> (N, T, width)."""
        check_volume_shape(volumes, self.img_size, "vit3d encoder")
        x = volumes.to(self.vit.patch_embedding.position_embeddings.dtype)
        features = self.vit.hidden_states(x, self.select_layer)
        if self.has_cls and not self.include_cls:
            features = features[:, 1:]
        return features
