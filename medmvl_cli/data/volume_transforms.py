"""Turn a volume file into the encoder's input: a float32 tensor (1, D, H, W) in [0, 1].

MONAI dictionary transforms, driven by a volume config: the recipe's ``VolumeConfig`` (or a
mapping / namespace with its keys, which ``VolumeConfig`` validates: the recipe schema is the one
place its rules live). `VolumePipeline` builds the transforms once, for every file it reads:

    load -> channel-first -> orientation -> [spacing] -> HU window to [0, 1] -> [foreground crop]
         -> resize to ``size`` -> (train only) random flips / 90° turns / intensity scale, shift

Axes: ``orientation`` names, with the nibabel / MONAI / DICOM letters (the direction each axis
*increases toward*), the W, H and D axes in that order (ITK's x, y, z); the tensor is laid out
depth first, (D, H, W), as SimpleITK's arrays and MedM-VL's ``.npy`` are. ``LPS`` gives axial
slices as a radiologist views them: D inferior -> superior, H anterior -> posterior, W the
patient's right -> left. ``spacing`` is in (D, H, W) order. See docs/volumes.md.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
)

from medmvl_cli.data.limits import DEFAULT_MAX_VOXELS
from medmvl_cli.data.volume_io import read_volume
from medmvl_cli.errors import DataError, MedmvlError, RecipeError

logger = logging.getLogger(__name__)

KEY = "image"
# Bump when the eval-mode output of the pipeline changes, so that caches rebuild.
PIPELINE_VERSION = 1
_CFG_PATH = "model.image3d.volume"
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclasses.dataclass(frozen=True)
class VolumeAugment:
    """Probabilities of the train-time random transforms (0 disables one)."""

    flip_prob: float = 0.0
    rotate90_prob: float = 0.0
    intensity_scale_prob: float = 0.0
    intensity_shift_prob: float = 0.0


@dataclasses.dataclass(frozen=True)
class VolumeParams:
    """A validated, hashable, picklable snapshot of a volume config."""

    size: tuple[int, int, int]
    window: tuple[float, float]
    spacing: tuple[float, float, float] | None
    orientation: str
    crop_foreground: bool
    augment: VolumeAugment = VolumeAugment()

    @classmethod
    def from_config(cls, cfg: Any) -> VolumeParams:
        """Accept a ``VolumeParams``, the pydantic ``VolumeConfig``, a namespace or a mapping; the
        last two are validated by ``VolumeConfig`` (the one place the recipe's rules live)."""
        if isinstance(cfg, VolumeParams):
            return cfg
        config = _volume_config(cfg)
        aug = config.augment
        augment = VolumeAugment(aug.flip_prob, aug.rotate90_prob, aug.intensity_scale_prob, aug.intensity_shift_prob)
        spacing = tuple(float(s) for s in config.spacing) if config.spacing is not None else None
        return cls(tuple(int(n) for n in config.size), (float(config.window[0]), float(config.window[1])), spacing,
                   config.orientation, bool(config.crop_foreground), augment)

    def eval_dict(self) -> dict:
        """The parameters the eval-mode output depends on (what a cache keys on)."""
        return {
            "pipeline": PIPELINE_VERSION,
            "size": list(self.size),
            "window": list(self.window),
            "spacing": None if self.spacing is None else list(self.spacing),
            "orientation": self.orientation,
            "crop_foreground": self.crop_foreground,
        }

    @property
    def axcodes(self) -> str:
        """MONAI ``Orientation`` codes for the (D, H, W) array axes."""
        return self.orientation[::-1]

    @property
    def augments(self) -> bool:
        return any(v > 0 for v in dataclasses.astuple(self.augment))


def _as_mapping(cfg: Any) -> Any:
    if cfg is None or isinstance(cfg, (Mapping, str, int, float, list, tuple)):
        return cfg
    return {k: _as_mapping(v) for k, v in vars(cfg).items()}


def _volume_config(cfg: Any):
    """A ``VolumeConfig`` from the config itself, a mapping or a namespace; a RecipeError naming
    the key otherwise."""
    from pydantic import ValidationError

    from medmvl_cli.config.schema import VolumeConfig

    if isinstance(cfg, VolumeConfig):
        return cfg
    try:
        return VolumeConfig.model_validate(_as_mapping(cfg))
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in (_CFG_PATH, *first["loc"]))
        raise RecipeError(f"{key}: {first['msg']}", hint="see docs/recipes.md for the volume settings") from None


class LoadVolumed(MapTransform):
    """Read the path under each key with ``read_volume`` (a channel-less RAS ``MetaTensor``),
    refusing files that declare more than ``max_voxels`` voxels."""

    def __init__(self, keys, max_voxels: int = DEFAULT_MAX_VOXELS):
        super().__init__(keys)
        self.max_voxels = max_voxels

    def __call__(self, data: Mapping) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = read_volume(out[key], self.max_voxels)
        return out


def _foreground(img: torch.Tensor) -> torch.Tensor:
    """Voxels above the window's floor; the whole volume when nothing is (never crop to empty)."""
    mask = img > 0
    return mask if bool(mask.any()) else torch.ones_like(mask)


def build_volume_transform(cfg: Any, train: bool = False, max_voxels: int = DEFAULT_MAX_VOXELS) -> Compose:
    """The MONAI pipeline for ``{"image": path}`` -> ``{"image": float32 tensor (1, D, H, W)}``.

    Random transforms are added only when ``train`` is true (and only those with a probability
    above 0). Call ``.set_random_state(seed)`` on the result for reproducible augmentation.
    """
    params = VolumeParams.from_config(cfg)
    transforms = _eval_transforms(params, max_voxels)
    if train:
        transforms += _augment_transforms(params)
    return Compose(transforms)


def _eval_transforms(params: VolumeParams, max_voxels: int = DEFAULT_MAX_VOXELS) -> list:
    return [LoadVolumed(KEY, max_voxels)] + _preprocess_transforms(params)


def _preprocess_transforms(params: VolumeParams) -> list:
    """Everything after reading the file; deterministic transforms that keep no per-call state."""
    steps: list = [
        EnsureChannelFirstd(KEY, channel_dim="no_channel"),
        Orientationd(KEY, axcodes=params.axcodes, labels=_RAS_LABELS),
    ]
    if params.spacing is not None:
        steps.append(Spacingd(KEY, pixdim=params.spacing, mode="bilinear", padding_mode="border"))
    lo, hi = params.window
    steps.append(ScaleIntensityRanged(KEY, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    if params.crop_foreground:
        steps.append(CropForegroundd(KEY, source_key=KEY, select_fn=_foreground, allow_smaller=True))
    # Trilinear like MedM-VL / M3D's preprocessing, which the pretrained 3D encoders were fed.
    steps.append(Resized(KEY, spatial_size=params.size, mode="trilinear"))
    steps.append(EnsureTyped(KEY, data_type="tensor", dtype=torch.float32, track_meta=False))
    return steps


def _augment_transforms(params: VolumeParams) -> list:
    aug = params.augment
    steps: list = []
    if aug.flip_prob > 0:
        steps += [RandFlipd(KEY, prob=aug.flip_prob, spatial_axis=axis) for axis in (0, 1, 2)]
    if aug.rotate90_prob > 0:
        steps.append(RandRotate90d(KEY, prob=aug.rotate90_prob, max_k=3, spatial_axes=(1, 2)))
    if aug.intensity_scale_prob > 0:
        steps.append(RandScaleIntensityd(KEY, factors=0.1, prob=aug.intensity_scale_prob))
    if aug.intensity_shift_prob > 0:
        steps.append(RandShiftIntensityd(KEY, offsets=0.1, prob=aug.intensity_shift_prob))
    if steps:
        steps.append(EnsureTyped(KEY, data_type="tensor", dtype=torch.float32, track_meta=False))
    return steps


def build_augment_transform(cfg: Any) -> Compose | None:
    """Only the train-time random transforms, for tensors that were preprocessed already (for
    example read from a ``VolumeCache``). ``None`` when every probability is 0."""
    steps = _augment_transforms(VolumeParams.from_config(cfg))
    return Compose(steps) if steps else None


def _torch_seed() -> int:
    # Draw from torch's generator so augmentation follows torch.manual_seed and differs per
    # DataLoader worker (torch seeds each worker differently), unlike MONAI's own RandomState.
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class VolumePipeline:
    """A volume config's MONAI pipeline, built once: ``load(path)`` reads and preprocesses a file,
    ``augment(tensor)`` applies the train-time random transforms. The deterministic steps keep no
    per-call state, so one pipeline serves every thread; the random ones are reseeded per call from
    torch's generator (DataLoader workers each hold their own copy)."""

    def __init__(self, cfg: Any):
        self.params = VolumeParams.from_config(cfg)
        self._preprocess = Compose(_preprocess_transforms(self.params))
        steps = _augment_transforms(self.params)
        self._augment = Compose(steps) if steps else None

    def load(self, path: str | Path, train: bool = False, max_voxels: int = DEFAULT_MAX_VOXELS) -> torch.Tensor:
        """One file as a float32 tensor (1, D, H, W) in [0, 1] (augmentation at train time may leave
        that range slightly). Raises ``DataError`` (a ``TooLargeError`` for a header declaring more
        than ``max_voxels`` voxels)."""
        if self.params.spacing is not None and str(path).lower().endswith(".npy"):
            logger.debug("%s: .npy has no geometry; `spacing` resamples it as 1 mm voxels.", path)
        volume = _run(lambda: self._preprocess({KEY: read_volume(str(path), max_voxels)}), path)
        return self.augment(volume) if train else volume

    def augment(self, volume: torch.Tensor) -> torch.Tensor:
        """The train-time random transforms on a preprocessed (1, D, H, W) tensor."""
        if self._augment is None:
            return volume
        self._augment.set_random_state(seed=_torch_seed())
        return self._augment({KEY: volume})[KEY].contiguous()


def augment_volume(volume: torch.Tensor, cfg: Any) -> torch.Tensor:
    """Apply the train-time random transforms to a preprocessed (1, D, H, W) tensor."""
    return VolumePipeline(cfg).augment(volume)


def load_volume(path: str | Path, cfg: Any, train: bool = False, max_voxels: int = DEFAULT_MAX_VOXELS) -> torch.Tensor:
    """Read and preprocess one volume (see `VolumePipeline.load`)."""
    return VolumePipeline(cfg).load(path, train=train, max_voxels=max_voxels)


def _run(transform: Callable[[], dict], path: str | Path) -> torch.Tensor:
    try:
        out = transform()[KEY]
    except Exception as err:
        # MONAI wraps errors raised inside a transform in RuntimeError; surface ours as they are.
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, MedmvlError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise DataError(
            f"{path}: preprocessing failed ({type(err).__name__}: {err}).",
            hint="Run with --debug for the traceback; check the volume opens in a viewer.",
        ) from err
    return out.contiguous()
