"""`clip`: a CLIP vision tower (transformers' CLIPVisionModel), LLaVA's 2D encoder.

CLIP puts a CLS token at position 0: `select_feature: patch` drops it (LLaVA's `patch`,
transformers' `vision_feature_select_strategy="default"`), `cls_patch` keeps it.
Input: (N, 3, H, W) pixels from the folder's CLIPImageProcessor.
"""

from __future__ import annotations

from typing import ClassVar

from medmvl_cli.model.encoders.hf_tower import HFVisionTower


class ClipTower(HFVisionTower):
    type: ClassVar[str] = "clip"
    has_cls: ClassVar[bool] = True

    @staticmethod
    def _classes():
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionConfig, CLIPVisionModel, CLIPImageProcessor
