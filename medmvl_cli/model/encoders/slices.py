"""`slices`: a 2D encoder (clip / siglip) run over the axial slices of a volume (MedM-VL's CT-Chest).

Input: volumes (B, 1, D, H, W) in [0, 1] with D = `num_slices`. Inside, the B·D slices go through
the 2D tower as one batch of images: resized (bilinear) to the tower's image size, repeated to 3
channels and normalised with the tower's image-processor mean / std. Output: the slices' features
concatenated along tokens, (B, D·T, width), slice by slice; the layout's grid is (D, gh, gw), with
one CLS token at the head of each slice when the tower has one and `select_feature: cls_patch`.
(MedM-VL's CT-Chest code from its weights' release day, 5a90f80, on does the same and pools all
slices' tokens with one attention pooling; before it, it averaged per-slice connector outputs,
the connectors' `slice_mean`.)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from medmvl_cli.errors import ModelError
from medmvl_cli.model.encoders.base import Encoder, TokenLayout
from medmvl_cli.model.encoders.clip import ClipTower
from medmvl_cli.model.encoders.hf_tower import HFVisionTower
from medmvl_cli.model.encoders.siglip import SiglipTower

BASES: dict[str, type[HFVisionTower]] = {"clip": ClipTower, "siglip": SiglipTower}


class SliceEncoder(Encoder):
    type: ClassVar[str] = "slices"
    modality: ClassVar[str] = "volume"

    def __init__(self, arch: dict[str, Any], base: HFVisionTower | None = None, attn_implementation: str = "sdpa"):
        super().__init__(arch)
        if base is None:
            base = BASES[arch["base"]].from_arch(arch["base_arch"], attn_implementation=attn_implementation)
        self.base = base
        self.num_slices = int(arch["num_slices"])
        self.width = base.width
        self.layout = TokenLayout((self.num_slices,) + base.layout.grid, self.num_slices * base.layout.cls_tokens)
        self._norm_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_recipe(cls, cfg: Any, volume: Any | None = None, attn_implementation: str = "sdpa") -> SliceEncoder:
        base = BASES[cfg.base].from_recipe(cfg, attn_implementation=attn_implementation)
        arch = {
            "type": cls.type, "base": cfg.base, "num_slices": cfg.num_slices,
            "select_layer": cfg.select_layer, "select_feature": cfg.select_feature, "base_arch": base.arch,
        }
        return cls(arch, base=base, attn_implementation=attn_implementation)

    def _mean_std(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Plain tensors cached per device / dtype rather than buffers: non-persistent buffers are
        # not restored by transformers' meta-device loading.
        key = (device, dtype)
        if key not in self._norm_cache:
            mean = torch.tensor(self.base.image_mean, device=device, dtype=dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.base.image_std, device=device, dtype=dtype).view(1, -1, 1, 1)
            self._norm_cache[key] = (mean, std)
        return self._norm_cache[key]

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) in [0, 1] -> (B, D·T, width)."""
        if volumes.dim() != 5 or volumes.shape[1] != 1 or volumes.shape[2] != self.num_slices:
            raise ModelError(
                f"slices encoder: volumes of shape {tuple(volumes.shape)} given; it takes (B, 1, {self.num_slices}, H, W)",
                hint="preprocess volumes to model.image3d.volume.size (its depth is num_slices)",
            )
        b, _, d, h, w = volumes.shape
        side = self.base.image_size
        x = volumes.transpose(1, 2).reshape(b * d, 1, h, w).to(self.base.tower.dtype)
        if (h, w) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        mean, std = self._mean_std(x.device, x.dtype)
        x = (x.expand(-1, 3, -1, -1) - mean) / std
        features = self.base(x)  # (B·D, T, C)
        return features.reshape(b, d * features.shape[1], features.shape[2])
