"""Limits on untrusted input, checked from file headers before anything is decoded.

A 2 MB ``.nii.gz`` can declare 1024³ voxels and expand to gigabytes; a small PNG can declare
50,000 × 50,000 pixels. Every reader of medmvl (volume_io, image_io, `data validate`, the volume
cache, the training dataset, `infer`, the demo) asks this module for the size a file *declares*
(NIfTI and NRRD / MHA / MHD headers, the ``.npy`` header, DICOM tags read without the pixels, PIL's
lazy open) and refuses it with ``TooLargeError`` before a single voxel is allocated:

- volumes: ``max_voxels`` (default ``DEFAULT_MAX_VOXELS`` = 512 × 512 × 2048, more than the
  largest real CTs); ``data.max_voxels`` in recipes, ``--max-voxels`` on the commands;
- 2D images: ``max_pixels`` (default ``DEFAULT_MAX_PIXELS``, PIL's own decompression-bomb
  threshold); ``data.max_pixels``, ``--max-pixels``;
- conversation turns: ``turn_char_limit(max_length)`` characters, checked before tokenisation.

This module imports no numpy / torch / MONAI at load time: the CLI's option defaults come from here.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medmvl_cli.config.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS  # noqa: F401 (the readers' defaults)
from medmvl_cli.errors import DataError

# A turn longer than max_length * this many characters cannot fit: real tokenizers average 3-5
# characters a token on prose and stay under 10 even on runs of spaces or symbols.
CHARS_PER_TOKEN_BOUND = 16
VOXELS_HINT = "If the file is genuine, raise the limit: --max-voxels N (infer, data validate, demo) or data.max_voxels in the recipe."
PIXELS_HINT = "If the file is genuine, raise the limit: --max-pixels N (infer, data validate, demo) or data.max_pixels in the recipe."


class TooLargeError(DataError):
    """A file whose header declares more voxels / pixels than the limit; nothing was decoded."""

    kind = "too_large"


def check_voxels(path: str | Path, voxels: int, max_voxels: int, shape: tuple | None = None) -> None:
    """Raise ``TooLargeError`` when a volume declares more than ``max_voxels`` voxels."""
    declared = f"shape {tuple(int(s) for s in shape)}, " if shape is not None else ""
    _refuse_above(path, f"the header declares {declared}{voxels:,} voxels", voxels, max_voxels, VOXELS_HINT)


def check_pixels(path: str | Path, pixels: int, max_pixels: int, size: tuple | None = None) -> None:
    """Raise ``TooLargeError`` when a 2D image declares more than ``max_pixels`` pixels."""
    declared = f"{size[0]} x {size[1]}, " if size is not None else ""
    _refuse_above(path, f"the image declares {declared}{pixels:,} pixels", pixels, max_pixels, PIXELS_HINT)


def _refuse_above(path: str | Path, declares: str, count: int, limit: int, hint: str) -> None:
    if count > limit:
        raise TooLargeError(f"{path}: {declares}, over the limit of {limit:,}; not decoded.", hint=hint)


# ------------------------------------------------------------------------------------ volumes
@dataclass(frozen=True)
class VolumeHeader:
    """What a volume file declares: reader format, array shape, voxel count, floating point or not."""

    fmt: str  # npy | nifti | itk | dicom
    shape: tuple[int, ...]
    voxels: int
    floating: bool
    short_by: int = 0  # bytes of data the file lacks, where that is known without decoding (.npy)


def volume_header(path: str | Path) -> VolumeHeader:
    """The declared shape of a volume file or DICOM folder, read from headers alone.

    Raises ``DataError`` for a file that is not what its suffix says (or not a volume format).
    """
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return _dicom_folder_header(path)
    if name.endswith(".npy"):
        return _npy_header(path)
    if name.endswith((".nii", ".nii.gz")):
        return _nifti_header(path)
    if name.endswith((".nrrd", ".mha", ".mhd")):
        return _itk_header(path)
    raise DataError(f"{path}: not a 3D volume format medmvl reads.",
                    hint="3D inputs are .npy, .nii / .nii.gz, .nrrd, .mha / .mhd, or a DICOM series folder.")


def checked_volume_header(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> VolumeHeader:
    """``volume_header``, refused with ``TooLargeError`` above ``max_voxels`` (and with
    ``DataError`` when the file is shorter than its header says)."""
    header = volume_header(path)
    check_voxels(path, header.voxels, max_voxels, header.shape)
    if header.short_by:
        raise DataError(f"{path}: truncated: {header.short_by:,} bytes short of the data its header declares.",
                        hint="Copy or save the file again.")
    return header


def _npy_header(path: Path) -> VolumeHeader:
    from numpy.lib import format as npy

    with open(path, "rb") as fh:
        try:
            version = npy.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = npy.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = npy.read_array_header_2_0(fh)
            else:  # 3.0 (utf-8 field names) has no public reader
                shape, _, dtype = npy._read_array_header(fh, version)
        except ValueError as err:
            raise DataError(f"{path}: not a .npy file ({err}).",
                            hint="Save the volume with numpy.save(path, array).") from err
        data_start = fh.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: holds Python objects, not a plain numeric array (medmvl never unpickles).",
                        hint="Save the volume with numpy.save(path, array) from a numeric array.")
    short_by = math.prod(shape) * dtype.itemsize - (path.stat().st_size - data_start)
    return VolumeHeader("npy", tuple(shape), math.prod(shape), dtype.kind in "fc", max(0, short_by))


def _nifti_header(path: Path) -> VolumeHeader:
    """The 348-byte (NIfTI-1) or 540-byte (NIfTI-2) header; a .nii.gz is decompressed that far only."""
    import nibabel as nib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        block = fh.read(nib.Nifti1Header.sizeof_hdr)
        if block[:4] in (struct.pack("<i", 540), struct.pack(">i", 540)):  # sizeof_hdr of NIfTI-2
            block += fh.read(nib.Nifti2Header.sizeof_hdr - len(block))
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        if len(block) >= klass.sizeof_hdr and klass.may_contain_header(block[:klass.sizeof_hdr]):
            header = klass(block[:klass.sizeof_hdr], check=False)
            break
    else:
        raise DataError(f"{path}: no NIfTI header (the file is truncated or not NIfTI).",
                        hint="Re-export the volume as NIfTI.")
    shape = tuple(int(s) for s in header.get_data_shape())
    scaling = [v for v in header.get_slope_inter() if v is not None]
    floating = header.get_data_dtype().kind in "fc" or not all(math.isfinite(v) for v in scaling)
    return VolumeHeader("nifti", shape, math.prod(shape), floating)


def _itk_header(path: Path) -> VolumeHeader:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header only, for NRRD, MetaImage (.mha / .mhd) alike
    components = reader.GetNumberOfComponents()
    if components != 1:
        raise DataError(f"{path}: has {components} components per voxel (a vector or colour image), "
                        "not one intensity.", hint="Save one scalar channel (HU) per voxel.")
    shape = tuple(reversed(reader.GetSize()))  # numpy order (z, y, x)
    floating = "float" in sitk.GetPixelIDValueAsString(reader.GetPixelID())
    return VolumeHeader("itk", shape, math.prod(shape), floating)


def _dicom_folder_header(folder: Path) -> VolumeHeader:
    """Rows × Columns × frames summed over the folder's DICOM files, read without their pixels."""
    import pydicom
    voxels, slices, plane = 0, 0, (0, 0)
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if file.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM, or damaged: the series reader skips or reports it
            continue
        if "Rows" not in ds or "Columns" not in ds:
            continue
        frames = dicom_frames(ds)
        plane = (int(ds.Rows), int(ds.Columns))
        voxels += frames * plane[0] * plane[1]
        slices += frames
    return VolumeHeader("dicom", (slices, *plane), voxels, False)


def dicom_frames(ds) -> int:
    """NumberOfFrames of a pydicom dataset (1 when absent or empty)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


# ------------------------------------------------------------------------------------- images
def check_dicom_pixels(path: str | Path, ds, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse a DICOM image whose Rows × Columns × frames exceeds ``max_pixels`` (tags only)."""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    check_pixels(path, rows * columns * dicom_frames(ds), max_pixels, (columns, rows))


_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS):
    """``PIL.Image.open`` (lazy: the header only), refused with ``TooLargeError`` above
    ``max_pixels``. The caller closes the image (``with open_image(...) as img``)."""
    from PIL import Image

    # PIL refuses on its own above twice its threshold; medmvl's limit is the one that counts.
    if max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as err:
        found = _PIL_PIXELS.search(str(err))
        check_pixels(path, int(found.group(1)) if found else max_pixels + 1, max_pixels)
        raise  # unreachable: PIL refuses only above medmvl's limit
    try:
        width, height = img.size
        check_pixels(path, width * height, max_pixels, (width, height))
    except TooLargeError:
        img.close()
        raise
    return img


# -------------------------------------------------------------------------------------- turns
def turn_char_limit(max_length: int) -> int:
    """Characters a single turn may hold before it is refused untokenised."""
    return int(max_length) * CHARS_PER_TOKEN_BOUND


def overlong_turn(texts: Iterable[str], max_length: int) -> str | None:
    """Which of ``texts`` is too long to tokenise for ``max_length`` tokens, and by how much; or None."""
    limit = turn_char_limit(max_length)
    for index, text in enumerate(texts):
        if len(text) > limit:
            return (f"turn {index} has {len(text):,} characters, over the limit of {limit:,} for max_length "
                    f"{max_length} ({CHARS_PER_TOKEN_BOUND} characters a token at most); not tokenised")
    return None


def overlong_reason(max_length: int) -> str:
    """The drop reason training reports for such records (one reason for all of them)."""
    return (f"a turn over {turn_char_limit(max_length):,} characters (model.llm.max_length x "
            f"{CHARS_PER_TOKEN_BOUND}), not tokenised")
