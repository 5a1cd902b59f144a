"""Slices of a volume as a radiologist expects to see them.

A volume is reoriented once, when it is opened, so that its array axes run (superior, posterior,
patient's left): then

- an axial slice has anterior at the top and the patient's right on the viewer's left,
- a coronal slice has superior at the top and the patient's right on the viewer's left,
- a sagittal slice has superior at the top and anterior on the viewer's left,

the radiological convention. Slices are resampled to square millimetres (thick CT slices would
otherwise squash the coronal and sagittal planes) and labelled with their orientation letters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PLANES = ("Axial", "Coronal", "Sagittal")
# The display array's axes (D, H, W) increase toward these directions (nibabel letters).
DISPLAY_AXCODES = ("S", "P", "L")
# Which array axis each plane cuts through.
PLANE_AXIS = {"Axial": 0, "Coronal": 1, "Sagittal": 2}
# Letters at the (top, bottom, left, right) edges of each plane once drawn.
PLANE_LABELS = {
    "Axial": ("A", "P", "R", "L"),
    "Coronal": ("S", "I", "R", "L"),
    "Sagittal": ("S", "I", "A", "P"),
}
# What the slider moves through, for its label.
PLANE_DIRECTION = {
    "Axial": "inferior → superior",
    "Coronal": "anterior → posterior",
    "Sagittal": "right → left",
}
VIEW_SIZE = 512  # pixels along the longer side of a displayed slice

Window = tuple[float, float]


@dataclass
class DisplayVolume:
    """A volume ready to page through: (D, H, W) as (superior, posterior, left), spacing in mm."""

    voxels: np.ndarray  # float16 to halve the memory of a large CT; precise enough to look at
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.voxels.shape)  # type: ignore[return-value]

    def num_slices(self, plane: str) -> int:
        return self.shape[PLANE_AXIS[plane]]

    def value_range(self) -> Window:
        return float(self.voxels.min()), float(self.voxels.max())


def to_display(array: np.ndarray, affine: np.ndarray) -> DisplayVolume:
    """Reorient an array with its voxel -> RAS mm ``affine`` into a ``DisplayVolume``."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    affine = np.asarray(affine, dtype=np.float64)
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(DISPLAY_AXCODES))
    voxels = apply_orientation(np.asarray(array), transform)
    new_affine = affine @ inv_ornt_aff(transform, array.shape)
    spacing = tuple(float(s) for s in np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0)))
    return DisplayVolume(np.ascontiguousarray(voxels, dtype=np.float16), spacing)  # type: ignore[arg-type]


def slice_pixels(volume: DisplayVolume, plane: str, index: int) -> tuple[np.ndarray, float, float]:
    """One slice as drawn (rows top to bottom), with its row and column spacing in mm."""
    if plane not in PLANE_AXIS:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    index = int(np.clip(index, 0, volume.num_slices(plane) - 1))
    d, h, w = volume.spacing
    if plane == "Axial":
        return volume.voxels[index], h, w
    if plane == "Coronal":
        return volume.voxels[::-1, index, :], d, w  # superior at the top
    return volume.voxels[::-1, :, index], d, h


def window_to_uint8(values: np.ndarray, window: Window) -> np.ndarray:
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def render_slice(volume: DisplayVolume, plane: str, index: int, window: Window,
                 size: int = VIEW_SIZE, labels: bool = True) -> Image.Image:
    """An RGB picture of one slice: windowed, in square millimetres, ``size`` px on its longer side."""
    pixels, row_mm, col_mm = slice_pixels(volume, plane, index)
    gray = window_to_uint8(pixels, window)
    height_mm, width_mm = gray.shape[0] * row_mm, gray.shape[1] * col_mm
    scale = size / max(height_mm, width_mm)
    out_size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    picture = Image.fromarray(np.ascontiguousarray(gray), mode="L").resize(out_size, Image.Resampling.BILINEAR)
    picture = picture.convert("RGB")
    if labels:
        _draw_labels(picture, PLANE_LABELS[plane])
    return picture


def _draw_labels(picture: Image.Image, letters: tuple[str, str, str, str]) -> None:
    draw = ImageDraw.Draw(picture)
    font_size = max(10, min(picture.size) // 24)
    try:
        font = ImageFont.load_default(size=font_size)
    except (TypeError, OSError):  # Pillow built without FreeType
        font = ImageFont.load_default()
    width, height = picture.size
    margin = max(3, font_size // 3)
    top, bottom, left, right = letters
    style = {"fill": (255, 214, 102), "font": font, "stroke_width": 2, "stroke_fill": (0, 0, 0)}
    draw.text((width / 2, margin), top, anchor="mt", **style)
    draw.text((width / 2, height - margin), bottom, anchor="mb", **style)
    draw.text((margin, height / 2), left, anchor="lm", **style)
    draw.text((width - margin, height / 2), right, anchor="rm", **style)
