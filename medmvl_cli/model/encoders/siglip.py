"""`siglip`: a SigLIP vision tower (transformers' SiglipVisionModel), MedM-VL's 2D encoder.

SigLIP has no CLS token: every token is a patch, so `select_feature: cls_patch` gives the same
tokens as `patch` (transformers' LLaVA calls this `vision_feature_select_strategy="full"`). We
accept `cls_patch` rather than refuse it because MedM-VL's SigLIP recipes use it to mean "all
tokens". The attention-pooling head SigLIP carries for its image-text loss is dropped after loading
(`vision_use_head=False`): the features never pass through it.
Input: (N, 3, H, W) pixels from the folder's SiglipImageProcessor.
"""

from __future__ import annotations

from typing import ClassVar

from medmvl_cli.model.encoders.hf_tower import HFVisionTower


class SiglipTower(HFVisionTower):
    type: ClassVar[str] = "siglip"
    has_cls: ClassVar[bool] = False

    @staticmethod
    def _classes():
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionConfig, SiglipVisionModel, SiglipImageProcessor

    @classmethod
    def _after_load(cls, tower) -> None:
        # Loaded with the head (so its released weights are expected, not reported), then dropped.
        if getattr(tower, "use_head", False):
            del tower.head
            tower.use_head = False
        tower.config.vision_use_head = False
