"""Image and volume files to the tensors the model takes, the same way at train and inference time.

Images: the file reader, then the encoder's HF image processor -> (N, 3, H, W).
Volumes: the file reader and MONAI preprocessing (or the volume cache) -> (N, 1, D, H, W) in [0, 1].
Both refuse files whose headers declare more than ``max_pixels`` / ``max_voxels`` (see limits.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from medmvl_cli.data.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS

logger = logging.getLogger(__name__)


class MediaLoader:
    """Loads a record's images and volumes; `train` turns on the recipe's volume augmentations.
    `max_voxels` / `max_pixels`: the size limits checked from each file's header."""

    def __init__(self, image_processor=None, image_window=None, volume_config=None,
                 cache_dir: Optional[str] = None, train: bool = False,
                 max_voxels: int = DEFAULT_MAX_VOXELS, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.image_processor = image_processor
        self.image_window = tuple(image_window) if image_window else None
        self.volume_config = volume_config
        self.train = train
        self.max_voxels = max_voxels
        self.max_pixels = max_pixels
        self._cache = None
        if cache_dir is not None and volume_config is not None:
            from medmvl_cli.data.volume_cache import VolumeCache

            self._cache = VolumeCache(cache_dir, max_voxels)

    def images(self, paths: Sequence[Path]) -> Optional[torch.Tensor]:
        """(N, 3, H, W) pixel values, or None for no images."""
        if not paths:
            return None
        from medmvl_cli.data.image_io import read_image
        from medmvl_cli.errors import DataError

        if self.image_processor is None:
            raise DataError(f"{paths[0]}: the model has no 2D branch to read images with",
                            hint="use a model with `model.image`, or drop the image from the record")
        pictures = [read_image(path, window=self.image_window, max_pixels=self.max_pixels) for path in paths]
        return self.image_processor(images=pictures, return_tensors="pt")["pixel_values"]

    def volumes(self, paths: Sequence[Path]) -> Optional[torch.Tensor]:
        """(N, 1, D, H, W) in [0, 1], or None for no volumes."""
        if not paths:
            return None
        from medmvl_cli.data.volume_transforms import augment_volume, load_volume
        from medmvl_cli.errors import DataError

        if self.volume_config is None:
            raise DataError(f"{paths[0]}: the model has no 3D branch to read volumes with",
                            hint="use a model with `model.image3d`, or drop the volume from the record")
        if self._cache is None:
            tensors = [load_volume(path, self.volume_config, train=self.train, max_voxels=self.max_voxels)
                       for path in paths]
        else:
            # The cache holds eval-mode tensors; train-time augmentations are applied on top.
            tensors = [self._cache.load(path, self.volume_config).float() for path in paths]
            if self.train:
                tensors = [augment_volume(t, self.volume_config) for t in tensors]
        return torch.stack([t.float() for t in tensors])
