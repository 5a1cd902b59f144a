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
from typing import Any, ClassVar

from medmvl_cli.errors import ModelError
from medmvl_cli.model.encoders.monai_vit3d_module import MonaiViT3d
from medmvl_cli.model.encoders.released_weights import optional_size, read_config
from medmvl_cli.model.encoders.volume_vit_base import VolumeViTEncoder, check_patch_grid, check_released_volume_size

M3D_DEFAULTS = {
    "img_size": (32, 256, 256), "patch_size": (4, 16, 16), "hidden_size": 768, "mlp_dim": 3072,
    "num_layers": 12, "num_heads": 12, "in_channels": 1,
}
TEXT_PREFIXES = ("language_encoder.", "mm_language_proj.", "mm_vision_proj.", "logit_scale")
UNUSED_VISION_KEYS = ("norm.weight", "norm.bias")


class M3dClipEncoder(VolumeViTEncoder):
    type: ClassVar[str] = "m3d_clip"

    def __init__(self, arch: dict[str, Any], attn_implementation: str = "sdpa"):
        vit = MonaiViT3d(
            img_size=tuple(arch["img_size"]), patch_size=tuple(arch["patch_size"]), hidden_size=arch["hidden_size"],
            mlp_dim=arch["mlp_dim"], num_layers=arch["num_layers"], num_heads=arch["num_heads"],
            in_channels=arch["in_channels"], cls_token=True, qkv_bias=False,
        )
        super().__init__(arch, vit)

    @classmethod
    def from_recipe(cls, cfg: Any, volume: Any | None = None, attn_implementation: str = "sdpa") -> M3dClipEncoder:
        folder = Path(cfg.path)
        released = read_config(folder)
        if released.get("pos_embed", "perceptron") != "perceptron":
            raise ModelError(
                f"m3d_clip encoder: {folder}/config.json has pos_embed {released['pos_embed']!r}; M3D-CLIP uses 'perceptron'",
                hint="this folder does not hold an M3D-CLIP checkpoint",
            )
        sizes = {k: optional_size(released, k, v) for k, v in M3D_DEFAULTS.items()}
        check_patch_grid(sizes["img_size"], sizes["patch_size"], "m3d_clip encoder")
        check_released_volume_size(volume, sizes["img_size"], "m3d_clip encoder", "M3D-CLIP")
        arch = {"type": cls.type, "select_layer": cfg.select_layer, "select_feature": cfg.select_feature}
        arch.update({k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()})
        return cls(arch).load_released(folder, prefix="vision_encoder.", ignored_prefixes=TEXT_PREFIXES,
                                       unused_vision_keys=UNUSED_VISION_KEYS)
