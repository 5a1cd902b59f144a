"""What the 3D ViT encoders (`vit3d`, `m3d_clip`, `medm_clip`) share.

Each wraps a ViT module with a `grid` (gd, gh, gw) and `hidden_states(x, upto)` returning
(N, 1 + patches, width) with the CLS token first (or (N, patches, width) without one). This base
checks volume shapes against the fixed position embeddings, selects the hidden state and drops the
CLS token unless `select_feature: cls_patch`, and loads released weights strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from medmvl_cli.errors import ModelError
from medmvl_cli.model.encoders.base import Encoder, TokenLayout, check_select_layer, mark_loaded
from medmvl_cli.model.encoders.released_weights import load_vision_weights, read_state_dict
from medmvl_cli.model.weight_files import reads_weights


def check_patch_grid(img_size: Sequence[int], patch_size: Sequence[int], what: str) -> None:
    bad = [f"{s} / {p}" for s, p in zip(img_size, patch_size) if s % p or s < p]
    if bad:
        raise ModelError(
            f"{what}: patch size {list(patch_size)} does not divide the volume size {list(img_size)} ({', '.join(bad)})",
            hint="choose model.image3d.volume.size as a multiple of the encoder's patch size on every axis",
        )


def check_volume_shape(volumes: torch.Tensor, img_size: Sequence[int], what: str) -> None:
    if volumes.dim() != 5 or tuple(volumes.shape[2:]) != tuple(img_size) or volumes.shape[1] != 1:
        raise ModelError(
            f"{what}: volumes of shape {tuple(volumes.shape)} given; the encoder takes (N, 1, {', '.join(map(str, img_size))})",
            hint="preprocess volumes to model.image3d.volume.size",
        )


def check_released_volume_size(volume: Any | None, img_size: Sequence[int], what: str, name: str) -> None:
    """A released encoder's position embeddings fix the volume size the recipe must ask for."""
    if volume is not None and list(volume.size) != list(img_size):
        raise ModelError(
            f"{what}: model.image3d.volume.size is {list(volume.size)} but {name} takes {list(img_size)}",
            hint=f"set model.image3d.volume.size to {list(img_size)} (its position embeddings are fixed)",
        )


class VolumeViTEncoder(Encoder):
    """A 3D ViT as an encoder: (N, 1, D, H, W) in [0, 1] -> (N, T, width). Subclasses build `vit`."""

    modality: ClassVar[str] = "volume"

    def __init__(self, arch: dict[str, Any], vit: nn.Module, has_cls: bool = True):
        super().__init__(arch)
        self.img_size = tuple(arch["img_size"])
        self.vit = vit
        self.select_layer = check_select_layer(arch["select_layer"], arch["num_layers"] + 1, self.what)
        self.has_cls = has_cls
        self.include_cls = has_cls and arch["select_feature"] == "cls_patch"
        self.width = arch["hidden_size"]
        self.layout = TokenLayout(vit.grid, 1 if self.include_cls else 0)

    @property
    def what(self) -> str:
        return f"{self.type} encoder"

    def normalize(self, volumes: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] volumes to what the ViT was trained on; by default, only its dtype."""
        return volumes.to(next(self.vit.parameters()).dtype)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) in [0, 1] -> (N, T, width)."""
        check_volume_shape(volumes, self.img_size, self.what)
        features = self.vit.hidden_states(self.normalize(volumes), self.select_layer)
        return features[:, 1:] if self.has_cls and not self.include_cls else features

    def load_released(self, folder: Path, *, prefix: str, ignored_prefixes: tuple[str, ...] = (),
                      unused_vision_keys: tuple[str, ...] = ()) -> VolumeViTEncoder:
        """Load the folder's weights into `vit` strictly (see `load_vision_weights`); nothing is read
        under `architecture_only()`."""
        if not reads_weights():
            return self
        state, source = read_state_dict(folder, self.what)
        load_vision_weights(self.vit, state, source=source, what=self.what, prefix=prefix,
                            ignored_prefixes=ignored_prefixes, unused_vision_keys=unused_vision_keys)
        mark_loaded(self)
        return self
