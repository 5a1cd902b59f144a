"""Encoder registry: one backend per file, chosen by the recipe's `type`.

| type      | input                                   | tokens (selected)                          |
|-----------|-----------------------------------------|--------------------------------------------|
| clip      | (N, 3, H, W) CLIP-normalised pixels     | (H/p)·(W/p) [+ 1 CLS with cls_patch]       |
| siglip    | (N, 3, H, W) SigLIP-normalised pixels   | (H/p)·(W/p) (no CLS token)                 |
| vit3d     | (N, 1, D, H, W) in [0, 1]               | (D/pd)(H/ph)(W/pw) [+ 1 CLS]               |
| m3d_clip  | (N, 1, 32, 256, 256) in [0, 1]          | 8·16·16 = 2048 [+ 1 CLS]                   |
| medm_clip | (N, 1, 32, 256, 256) in [0, 1]          | 8·16·16 = 2048 [+ 1 CLS]                   |
| slices    | (N, 1, S, H, W) in [0, 1], S=num_slices | S · (2D tower's tokens)                    |
"""

from __future__ import annotations

from typing import Any

from medmvl_cli.errors import ModelError
from medmvl_cli.model.encoders.base import Encoder, TokenLayout
from medmvl_cli.model.encoders.clip import ClipTower
from medmvl_cli.model.encoders.m3d_clip import M3dClipEncoder
from medmvl_cli.model.encoders.medm_clip import MedmClipEncoder
from medmvl_cli.model.encoders.siglip import SiglipTower
from medmvl_cli.model.encoders.slices import SliceEncoder
from medmvl_cli.model.encoders.vit3d import Vit3dEncoder

ENCODERS: dict[str, type[Encoder]] = {
    cls.type: cls for cls in (ClipTower, SiglipTower, Vit3dEncoder, M3dClipEncoder, MedmClipEncoder, SliceEncoder)
}


def _lookup(kind: str) -> type[Encoder]:
    if kind not in ENCODERS:
        raise ModelError(f"unknown encoder type {kind!r}", hint=f"known types: {', '.join(ENCODERS)}")
    return ENCODERS[kind]


def encoder_from_recipe(cfg: Any, volume: Any | None = None, attn_implementation: str = "sdpa") -> Encoder:
    """Build the encoder a recipe section describes, released weights loaded."""
    return _lookup(cfg.type).from_recipe(cfg, volume=volume, attn_implementation=attn_implementation)


def encoder_from_arch(arch: dict, attn_implementation: str = "sdpa") -> Encoder:
    """Rebuild a saved encoder's architecture (random weights, to be loaded from the model folder)."""
    return _lookup(arch["type"]).from_arch(arch, attn_implementation=attn_implementation)


__all__ = ["ENCODERS", "Encoder", "TokenLayout", "encoder_from_arch", "encoder_from_recipe"]
