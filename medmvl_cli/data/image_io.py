"""Read 2D images into RGB ``PIL.Image``s, and turn them into encoder pixel values.

PNG / JPEG / BMP / TIFF go through PIL; single-frame DICOM through pydicom, with the modality
rescale (slope / intercept) applied, a window taken from the ``window=(low, high)`` argument or
else the header's first WindowCenter / WindowWidth (else the image's min / max), and MONOCHROME1
inverted so that bright means dense as in MONOCHROME2. Multi-frame DICOM, multi-page TIFF, 3D
arrays and volume files are volumes: they raise ``DataError`` saying so. A file whose header
declares more than ``max_pixels`` pixels is refused before decoding (``limits.TooLargeError``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medmvl_cli.data.file_kinds import DICOM_SUFFIXES, IMAGE_SUFFIXES, VOLUME_SUFFIXES, is_dicom
from medmvl_cli.data.limits import DEFAULT_MAX_PIXELS, check_dicom_pixels, open_image
from medmvl_cli.errors import DataError

logger = logging.getLogger(__name__)

# volume_io.VOLUME_SUFFIXES, repeated so that reading 2D images never imports torch / MONAI.
_VOLUME_HINT = "List volumes under `image3d` (and `<image3d>` in the conversation), not `image`."

Window = tuple[float, float]


def read_image(source: str | Path | np.ndarray | Image.Image, window: Window | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB ``PIL.Image`` from a file path, a 2-D / H×W×3 array or a PIL image.

    ``window=(low, high)`` maps that value range (in rescaled units, e.g. HU) to black..white
    for grayscale inputs; without it DICOM uses its header window, other images their range
    (16-bit / float) or their 8-bit values as they are. Files declaring more than
    ``max_pixels`` pixels raise ``limits.TooLargeError`` before they are decoded.
    """
    if window is not None and not float(window[0]) < float(window[1]):
        raise ValueError(f"window must be (low, high) with low < high, got {window!r}")
    if isinstance(source, Image.Image):
        return _from_pil(source, "<image>", window)
    if isinstance(source, np.ndarray):
        return _from_array(source, "<array>", window)
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{path}: is a folder (a DICOM series is a 3D volume), not a 2D image.", hint=_VOLUME_HINT)
    if not path.is_file():
        raise DataError(f"{path}: no such image file.",
                        hint="Check `image_root` and the `image` paths of the annotation file.")
    if path.name.lower().endswith(VOLUME_SUFFIXES):
        raise DataError(f"{path}: is a 3D volume format, not a 2D image.", hint=_VOLUME_HINT)
    if path.suffix.lower() in DICOM_SUFFIXES or (path.suffix.lower() not in IMAGE_SUFFIXES and is_dicom(path)):
        return _read_dicom(path, window, max_pixels)
    return _read_pil(path, window, max_pixels)


load_image = read_image  # the same function under the name HF's image utilities use


def _read_pil(path: Path, window: Window | None, max_pixels: int) -> Image.Image:
    try:
        with open_image(path, max_pixels) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise DataError(
                    f"{path}: holds {img.n_frames} frames (a stack of slices is a 3D volume), not one 2D image.",
                    hint=_VOLUME_HINT,
                )
            img.load()
            img = ImageOps.exif_transpose(img)  # as viewers (and HF's load_image) show it
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read this image ({err}).",
                        hint="Supported 2D files: PNG, JPEG, BMP, TIFF and single-frame DICOM.") from err
    return _from_pil(img, str(path), window)


def _from_pil(img: Image.Image, name: str, window: Window | None) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _from_array(np.asarray(img), name, window)
    if window is not None and img.mode == "L":
        return _from_array(np.asarray(img), name, window)
    return img.convert("RGB")


def _from_array(array: np.ndarray, name: str, window: Window | None) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] in (3, 4) and min(array.shape[:2]) > 4:
        if array.dtype != np.uint8:
            raise DataError(f"{name}: an RGB array must be uint8, got {array.dtype}.",
                            hint="Convert it with array.astype(numpy.uint8) after scaling to 0..255.")
        return Image.fromarray(np.ascontiguousarray(array[..., :3]), mode="RGB")
    if array.ndim != 2:
        raise DataError(f"{name}: a {array.ndim}-D array of shape {tuple(array.shape)} is a volume, not a 2D image.",
                        hint=_VOLUME_HINT)
    if window is None and array.dtype == np.uint8:
        gray = array
    else:
        gray = _window_to_uint8(array.astype(np.float32), window)
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


def _window_to_uint8(values: np.ndarray, window: Window | None) -> np.ndarray:
    """Linear map of [low, high] (default: the data's min..max) to 0..255, clipped."""
    lo, hi = (float(values.min()), float(values.max())) if window is None else (float(window[0]), float(window[1]))
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _read_dicom(path: Path, window: Window | None, max_pixels: int) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_rescale

    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        raise DataError(f"{path}: unreadable DICOM file ({err}).", hint="Re-export it, or convert it to PNG.") from err
    if "PixelData" not in ds:
        raise DataError(f"{path}: is a DICOM file without an image (a DICOMDIR, report or structure set?).",
                        hint="List DICOM image files only.")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: is a multi-frame DICOM ({frames} frames), a 3D volume rather than a 2D image.",
                        hint=_VOLUME_HINT + " Convert it to NIfTI (e.g. dcm2niix) to use it as a volume.")
    check_dicom_pixels(path, ds, max_pixels)
    try:
        pixels = ds.pixel_array
    except Exception as err:
        raise DataError(
            f"{path}: cannot decode the pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}: {err}).",
            hint="Install a decoder (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg) or convert to PNG.",
        ) from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # RGB (pydicom converts YBR to RGB)
        if pixels.dtype != np.uint8:
            bits = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize))
            if photometric == "PALETTE COLOR":  # the LUT's own depth: its descriptor's third value
                bits = int(ds.get("RedPaletteColorLookupTableDescriptor", [0, 0, 16])[2])
            pixels = np.rint(pixels.astype(np.float64) * (255.0 / (2**bits - 1))).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    if pixels.ndim != 2:
        raise DataError(f"{path}: pixel data of shape {pixels.shape} is not one 2D image.", hint=_VOLUME_HINT)
    values = np.asarray(apply_rescale(pixels, ds), dtype=np.float32)  # RescaleSlope / RescaleIntercept
    gray = _window_to_uint8(values, window if window is not None else _header_window(ds, path))
    if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
        gray = 255 - gray
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


def _header_window(ds: Any, path: Path) -> Window | None:
    """The first (WindowCenter, WindowWidth) pair of the header as (low, high), if usable."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center = float(center[0] if _is_multi(center) else center)
        width = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        logger.debug("%s: unusable WindowCenter / WindowWidth %r / %r", path, center, width)
        return None
    if width <= 0:
        return None
    return center - width / 2.0, center + width / 2.0


def _is_multi(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def to_pixel_values(images: Sequence[Image.Image | str | Path], processor: Any):
    """Pixel values (N, 3, H, W) float32 from an HF image processor (``CLIPImageProcessor``,
    ``SiglipImageProcessor`` and their PIL back-ends work without torchvision).

    Paths are read with ``read_image`` first.
    """
    import torch

    pil = [img if isinstance(img, Image.Image) else read_image(img) for img in images]
    if not pil:
        raise ValueError("to_pixel_values needs at least one image")
    out = processor(images=pil, return_tensors="pt")["pixel_values"]
    out = torch.as_tensor(out, dtype=torch.float32)
    if out.ndim != 4 or out.shape[0] != len(pil) or out.shape[1] != 3:
        raise ValueError(f"image processor returned pixel values of shape {tuple(out.shape)}, expected (N, 3, H, W)")
    return out
