"""What the page says about the model: its name, branches and preprocessing, read off a Predictor's processor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BRANCH_NAMES = {"image": "2D images", "image3d": "3D volumes"}
PLACEHOLDERS = {"image": "<image>", "image3d": "<image3d>"}
VOLUME_KEYS = ("size", "window", "spacing", "orientation", "crop_foreground")


@dataclass
class ModelInfo:
    name: str
    path: str
    branches: tuple[str, ...]  # "image" and / or "image3d"
    template: str | None = None
    device: str | None = None
    image_size: tuple[int, int] | None = None  # (H, W) the 2D encoder takes
    image_window: tuple[float, float] | None = None  # window applied to DICOM / 16-bit images
    volume: dict = field(default_factory=dict)  # VOLUME_KEYS
    tokens: dict = field(default_factory=dict)  # placeholder -> tokens it expands to

    @property
    def volume_window(self) -> tuple[float, float] | None:
        window = self.volume.get("window")
        return (float(window[0]), float(window[1])) if window else None

    def branch_text(self) -> str:
        return " and ".join(BRANCH_NAMES[b] for b in self.branches) or "no media (text only)"

    def markdown(self) -> str:
        """A short card for the page."""
        rows = [f"**Model:** `{self.name}`", f"**Reads:** {self.branch_text()}"]
        if "image" in self.branches:
            size = f"{self.image_size[1]} × {self.image_size[0]} px" if self.image_size else "the encoder's size"
            window = (f"window {self.image_window[0]:g} to {self.image_window[1]:g}" if self.image_window
                      else "pixels as stored (DICOM: its header window)")
            rows.append(f"**2D input:** {window} · resized to {size} · {self.tokens.get('<image>', '?')} tokens")
        if "image3d" in self.branches:
            vol = self.volume
            size = " × ".join(str(n) for n in vol.get("size", ())) or "?"
            window = self.volume_window
            window_text = f"HU window {window[0]:g} to {window[1]:g}" if window else "no window"
            spacing = vol.get("spacing")
            spacing_text = ("voxel grid kept" if not spacing
                            else "resampled to " + " × ".join(f"{s:g}" for s in spacing) + " mm")
            crop = " · body crop" if vol.get("crop_foreground") else ""
            rows.append(f"**3D input:** {window_text} · {spacing_text}{crop} · resized to {size} (D × H × W, "
                        f"{vol.get('orientation', '?')}) · {self.tokens.get('<image3d>', '?')} tokens")
        extra = [f"template {self.template}" if self.template else "", f"on {self.device}" if self.device else ""]
        extra_text = ", ".join(e for e in extra if e)
        rows.append(f"<small>{self.path}{' · ' + extra_text if extra_text else ''}</small>")
        return "  \n".join(rows)


def describe_model(predictor: Any) -> ModelInfo:
    """Read the name, branches and preprocessing off a ``Predictor``'s processor."""
    processor = predictor.processor
    volume = processor.volume
    return ModelInfo(
        name=str(predictor.name),
        path=str(predictor.model_dir),
        branches=tuple(branch for branch, placeholder in PLACEHOLDERS.items() if placeholder in processor.tokens),
        template=processor.template_name,
        device=str(predictor.device),
        image_size=_image_size(processor.image_processor),
        image_window=processor.image_window,
        volume=volume.model_dump(mode="json", include=set(VOLUME_KEYS)) if volume is not None else {},
        tokens=dict(processor.tokens),
    )


def _image_size(processor: Any) -> tuple[int, int] | None:
    """(H, W) from an HF image processor's crop_size / size."""
    if processor is None:
        return None
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if isinstance(size, Mapping) or hasattr(size, "get"):
            height, width = size.get("height"), size.get("width")
            if height and width:
                return int(height), int(width)
            edge = size.get("shortest_edge")
            if edge:
                return int(edge), int(edge)
        elif isinstance(size, int):
            return size, size
    return None
