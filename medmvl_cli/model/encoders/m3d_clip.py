"""`m3d_clip`: the 3D ViT of M3D-CLIP (BAAI-DCAI/M3D, `LaMed/src/model/CLIP.py`), released weights.

Architecture (sizes from the folder's config.json when present, else M3D's): input 1x32x256x256,
patch 4x16x16 (8x16x16 = 2048 patches), hidden 768, 12 blocks, 12 heads, MLP 3072, no qkv bias,
linear patch embedding, learned position embedding added before the CLS token is prepended.

Weights: `model.safetensors` / `pytorch_model.bin` of the whole M3D-CLIP (vision keys prefixed
`vision_encoder.`; `language_encoder.*`, `mm_language_proj.*`, `mm_vision_proj.*` and `logit_scale`
are dropped), or M3D's bare `pretrained_ViT.bin` (un-prefixed keys). Any vision key missing or
unexpected is an error. The final `norm` is checked and dropped: hidden states are taken before it
(HF / MedM-VL convention), so `select_layer: -1` is the last block's output. (M3D-LaMed's own
`-1` applies that norm.)

Input: volumes (N, 1, 32, 256, 256) in [0, 1], as M3D's data are (min-max normalised CT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from medmvl_cli.errors import ModelError
from medmvl_cli.model.encoders.base import Encoder, TokenLayout, check_select_layer, mark_loaded
from medmvl_cli.model.encoders.monai_vit import MonaiViT3d
from medmvl_cli.model.encoders.released import load_vision_weights, optional_size, read_config, read_state_dict
from medmvl_cli.model.encoders.vit3d import check_patch_grid, check_volume_shape

M3D_DEFAULTS = {
    "img_size": (32, 256, 256), "patch_size": (4, 16, 16), "hidden_size": 768, "mlp_dim": 3072,
    "num_layers": 12, "num_heads": 12, "in_channels": 1,
}
TEXT_PREFIXES = ("language_encoder.", "mm_language_proj.", "mm_vision_proj.", "logit_scale")
UNUSED_VISION_KEYS = ("norm.weight", "norm.bias")


class M3dClipEncoder(Encoder):
    type: ClassVar[str] = "m3d_clip"
    modality: ClassVar[str] = "volume"

    def __init__(self, arch: dict[str, Any], attn_implementation: str = "sdpa"):
        super().__init__(arch)
        self.img_size = tuple(arch["img_size"])
        self.vit = MonaiViT3d(
            img_size=self.img_size, patch_size=tuple(arch["patch_size"]), hidden_size=arch["hidden_size"],
            mlp_dim=arch["mlp_dim"], num_layers=arch["num_layers"], num_heads=arch["num_heads"],
            in_channels=arch["in_channels"], cls_token=True, qkv_bias=False,
        )
        self.select_layer = check_select_layer(arch["select_layer"], arch["num_layers"] + 1, "m3d_clip encoder")
        self.include_cls = arch["select_feature"] == "cls_patch"
        self.width = arch["hidden_size"]
        self.layout = TokenLayout(self.vit.grid, 1 if self.include_cls else 0)

    @classmethod
    def from_recipe(cls, cfg: Any, volume: Optional[Any] = None, attn_implementation: str = "sdpa") -> "M3dClipEncoder":
        folder = Path(cfg.path)
        released = read_config(folder)
        if released.get("pos_embed", "perceptron") != "perceptron":
            raise ModelError(
                f"m3d_clip encoder: {folder}/config.json has pos_embed {released['pos_embed']!r}; M3D-CLIP uses 'perceptron'",
                hint="this folder does not hold an M3D-CLIP checkpoint",
            )
        sizes = {k: optional_size(released, k, v) for k, v in M3D_DEFAULTS.items()}
        check_patch_grid(sizes["img_size"], sizes["patch_size"], "m3d_clip encoder")
        if volume is not None and tuple(volume.size) != tuple(sizes["img_size"]):
            raise ModelError(
                f"m3d_clip encoder: model.image3d.volume.size is {list(volume.size)} but M3D-CLIP takes {list(sizes['img_size'])}",
                hint=f"set model.image3d.volume.size to {list(sizes['img_size'])} (its position embeddings are fixed)",
            )
        arch = {"type": cls.type, "select_layer": cfg.select_layer, "select_feature": cfg.select_feature}
        arch.update({k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()})
        encoder = cls(arch)
        state, source = read_state_dict(folder, "m3d_clip encoder")
        load_vision_weights(
            encoder.vit, state, source=source, what="m3d_clip encoder", prefix="vision_encoder.",
            ignored_prefixes=TEXT_PREFIXES, unused_vision_keys=UNUSED_VISION_KEYS,
        )
        mark_loaded(encoder)
        return encoder

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) in [0, 1] -> (N, T, width)."""
        check_volume_shape(volumes, self.img_size, "m3d_clip encoder")
        x = volumes.to(self.vit.patch_embedding.position_embeddings.dtype)
        features = self.vit.hidden_states(x, self.select_layer)
        return features if self.include_cls else features[:, 1:]
