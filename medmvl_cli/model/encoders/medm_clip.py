"""`medm_clip`: MedM-CLIP's 3D ViT (MSIIP/MedM-VL, `lvlm/model/encoder/medmclip.py`), released weights.

Architecture (sizes from the folder's config.json: `hidden_size`, `image_size`, `image_patch_size`,
`frame_size`, `frame_patch_size`, `image_num_heads`, `image_mlp_dim`, `image_num_layers`; MedM-CLIP's
defaults 768 / 256 / 16 / 32 / 4 / 12 / 3072 / 12): patch embedding = rearrange
`b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)` -> LayerNorm -> Linear -> LayerNorm; CLS token
prepended, then a learned position embedding over CLS + patches; post-norm
`nn.TransformerEncoderLayer`s (ReLU, no dropout).

Weights by their released names: `vision_encoder.to_patch_embedding.{1,2,3}.*`,
`vision_encoder.pos_embedding`, `vision_encoder.cls_token`, `vision_encoder.transformer_layers.N.*`.
`vision_encoder.mlp_head.*` (the contrastive head) is checked and dropped; `text_encoder.*` and
`logit_scale` are dropped. Unlike MedM-VL, the features are not detached, so `trainable: full`
trains the encoder.

Input: volumes (N, 1, D, H, W) in [0, 1]; inside, x 255 and z-scored with MedM-CLIP's mean 55.698
and std 66.194, as its training data were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from medmvl_cli.model.encoders.released_weights import read_config
from medmvl_cli.model.encoders.volume_vit_base import VolumeViTEncoder, check_patch_grid, check_released_volume_size

MEAN, STD = 55.6982188356434, 66.1943479570918
MEDM_DEFAULTS = {
    "hidden_size": 768, "image_size": 256, "image_patch_size": 16, "frame_size": 32, "frame_patch_size": 4,
    "image_num_heads": 12, "image_mlp_dim": 3072, "image_num_layers": 12,
}
TEXT_PREFIXES = ("text_encoder.", "logit_scale")
UNUSED_VISION_KEYS = ("mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias")


class Patchify3d(nn.Module):
    """(N, C, D, H, W) -> (N, (D/pf)(H/p1)(W/p2), p1·p2·pf·C): MedM-CLIP's rearrange, in torch ops."""

    def __init__(self, pf: int, p1: int, p2: int):
        super().__init__()
        self.pf, self.p1, self.p2 = pf, p1, p2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, d, h, w = x.shape
        pf, p1, p2 = self.pf, self.p1, self.p2
        x = x.reshape(n, c, d // pf, pf, h // p1, p1, w // p2, p2)
        x = x.permute(0, 2, 4, 6, 5, 7, 3, 1)  # n, f, h, w, p1, p2, pf, c
        return x.reshape(n, (d // pf) * (h // p1) * (w // p2), p1 * p2 * pf * c)


class MedmClipViT(nn.Module):
    """MedM-CLIP's vision transformer, named as released (without its contrastive head)."""

    def __init__(self, img_size, patch_size, dim: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        grid = tuple(s // p for s, p in zip(img_size, patch_size))
        patch_dim = patch_size[0] * patch_size[1] * patch_size[2]
        self.to_patch_embedding = nn.Sequential(
            Patchify3d(*patch_size), nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim)
        )
        num_patches = grid[0] * grid[1] * grid[2]
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=mlp_dim, dropout=0.0, batch_first=True)
            for _ in range(depth)
        )
        self.grid = grid
        self.gradient_checkpointing = False

    def init_own_weights(self, std: float) -> None:
        """Its embeddings N(0, std); called by `MedmvlPreTrainedModel._init_weights`."""
        from transformers import initialization as init

        init.normal_(self.pos_embedding, mean=0.0, std=std)
        init.normal_(self.cls_token, mean=0.0, std=std)

    def hidden_states(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        """(N, 1, D, H, W) z-scored -> hidden state `upto` (0 = embeddings), (N, 1 + patches, dim)."""
        x = self.to_patch_embedding(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embedding[:, : x.shape[1]]
        for layer in self.transformer_layers[:upto]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(layer.__call__, x)
            else:
                x = layer(x)
        return x


def _sizes(released: dict) -> dict:
    sizes = dict(MEDM_DEFAULTS)
    sizes.update({k: released[k] for k in MEDM_DEFAULTS if k in released})
    image_size, patch = sizes["image_size"], sizes["image_patch_size"]
    # MedM-VL's loader rewrites image_size / patch_size as [D, H, W] lists; accept both forms.
    img = tuple(image_size) if isinstance(image_size, list) else (sizes["frame_size"], image_size, image_size)
    pch = tuple(patch) if isinstance(patch, list) else (sizes["frame_patch_size"], patch, patch)
    return {
        "img_size": list(img), "patch_size": list(pch), "hidden_size": sizes["hidden_size"],
        "num_layers": sizes["image_num_layers"], "num_heads": sizes["image_num_heads"], "mlp_dim": sizes["image_mlp_dim"],
    }


class MedmClipEncoder(VolumeViTEncoder):
    type: ClassVar[str] = "medm_clip"

    def __init__(self, arch: dict[str, Any], attn_implementation: str = "sdpa"):
        vit = MedmClipViT(
            tuple(arch["img_size"]), tuple(arch["patch_size"]), arch["hidden_size"], arch["num_layers"],
            arch["num_heads"], arch["mlp_dim"],
        )
        super().__init__(arch, vit)

    @classmethod
    def from_recipe(cls, cfg: Any, volume: Any | None = None, attn_implementation: str = "sdpa") -> MedmClipEncoder:
        folder = Path(cfg.path)
        sizes = _sizes(read_config(folder))
        check_patch_grid(sizes["img_size"], sizes["patch_size"], "medm_clip encoder")
        check_released_volume_size(volume, sizes["img_size"], "medm_clip encoder", "MedM-CLIP")
        arch = {"type": cls.type, "select_layer": cfg.select_layer, "select_feature": cfg.select_feature, **sizes}
        return cls(arch).load_released(folder, prefix="vision_encoder.", ignored_prefixes=TEXT_PREFIXES,
                                       unused_vision_keys=UNUSED_VISION_KEYS)

    def normalize(self, volumes: torch.Tensor) -> torch.Tensor:
        """x 255, then MedM-CLIP's z-score, as its training data were."""
        return (super().normalize(volumes) * 255.0 - MEAN) / STD
