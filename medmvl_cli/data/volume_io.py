"""Read 3D volumes (CT / MR) into MONAI ``MetaTensor``s that carry their real geometry.

Formats: ``.npy`` (HU, D×H×W as MedM-VL writes them), ``.nii`` / ``.nii.gz`` (MONAI's
``NibabelReader``), ``.nrrd`` / ``.mha`` / ``.mhd`` (SimpleITK; MONAI's ``ITKReader`` would need
``itk``), and a folder holding one DICOM series (pydicom; slices ordered by their position along
the slice normal, rescale slope / intercept applied).

Every reader returns an array in float32 and a 4×4 affine from voxel index to **RAS** world
millimetres (the NIfTI / MONAI convention), so ``Orientationd`` / ``Spacingd`` work from the
file's geometry. ``.npy`` has no geometry: it is assumed to be D×H×W with D from inferior to
superior, H from anterior to posterior and W from the patient's right to left (an axial stack as
a radiologist views it, which is what SimpleITK's ``GetArrayFromImage`` gives for a standard
axial CT), with 1 mm voxels. See docs/volumes.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import ImageReader, MetaTensor, NibabelReader, NumpyReader

from medmvl_cli.data.file_kinds import VOLUME_SUFFIXES
from medmvl_cli.data.limits import DEFAULT_MAX_VOXELS, checked_volume_header
from medmvl_cli.errors import DataError

logger = logging.getLogger(__name__)

_FORMATS_HINT = (
    "3D inputs are .npy (HU, D×H×W), .nii / .nii.gz, .nrrd, .mha / .mhd, or a folder holding "
    "one DICOM series. A single .dcm file is a 2D image: list it under `image`."
)
# LPS (DICOM / ITK world) <-> RAS (NIfTI / MONAI world): negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# .npy voxel axes (D, H, W) point to superior, posterior and the patient's left, 1 mm apart.
NPY_AFFINE = np.array(
    [[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


def volume_format(path: str | Path) -> str:
    """Which reader a path needs: ``npy``, ``nifti``, ``itk`` or ``dicom`` (a folder)."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith((".nrrd", ".mha", ".mhd")):
        return "itk"
    raise DataError(f"{path}: not a 3D volume format medmvl reads.", hint=_FORMATS_HINT)


def is_volume_path(path: str | Path) -> bool:
    """True for a folder or a file whose suffix is one of the 3D formats (does not read it)."""
    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(VOLUME_SUFFIXES)


def source_files(path: str | Path) -> list[Path]:
    """The files a volume is read from: the file itself, a ``.mhd`` and its data file, or the
    files of a DICOM folder (top level). Used to key caches on file identity."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [path]
    if path.name.lower().endswith(".mhd"):
        data_file = _mhd_data_file(path)
        if data_file is not None:
            files.append(data_file)
    return files


def _mhd_data_file(path: Path) -> Path | None:
    try:
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "ElementDataFile":
                value = value.strip()
                if value.upper() in ("LOCAL", "LIST") or "%" in value:
                    return None
                return path.parent / value
    except OSError:
        return None
    return None


def read_volume(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> MetaTensor:
    """Read one volume. Returns a channel-less float32 ``MetaTensor`` with a RAS ``affine``.

    Raises ``DataError`` naming the file for a missing or unreadable file, a 2-D or 4-D array,
    a folder holding several DICOM series, and NaN / Inf values; ``limits.TooLargeError`` when
    the header declares more than ``max_voxels`` voxels (checked before decoding).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"{path}: no such volume file or folder.",
            hint="Check `volume_root` and the `image3d` paths of the annotation file.",
        )
    reader = VolumeReader(max_voxels)
    array, meta = reader.get_data(reader.read(path))
    meta["affine"] = torch.as_tensor(meta["affine"], dtype=torch.float64)
    meta["filename_or_obj"] = str(path)
    return MetaTensor(torch.from_numpy(array), meta=meta)


class VolumeReader(ImageReader):
    """A MONAI ``ImageReader`` for every 3D input medmvl accepts, so it also plugs into
    ``LoadImage(reader=VolumeReader())``. ``get_data`` gives a float32 array and MONAI's
    meta keys (``affine`` in RAS, ``original_affine``, ``spatial_shape``, ``space``).
    A file whose header declares more than ``max_voxels`` voxels is refused before decoding."""

    def __init__(self, max_voxels: int = DEFAULT_MAX_VOXELS):
        super().__init__()
        self.max_voxels = max_voxels

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(is_volume_path(name) for name in names)

    def read(self, data, **kwargs):
        names = [data] if isinstance(data, (str, Path)) else list(data)
        loaded = [_read_any(Path(name), self.max_voxels) for name in names]
        return loaded[0] if len(loaded) == 1 else loaded

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        if isinstance(img, list):
            if len(img) != 1:
                raise DataError("medmvl reads one volume at a time.", hint="Pass a single path.")
            img = img[0]
        array, affine, info = img
        meta = {
            "affine": affine.copy(),
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(array.shape),
            "original_channel_dim": float("nan"),  # "no_channel" for EnsureChannelFirst
            "space": "RAS",
            **info,
        }
        return array, meta


def _read_any(path: Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray, dict]:
    fmt = volume_format(path)
    reader = {"npy": _read_npy, "nifti": _read_nifti, "itk": _read_itk, "dicom": _read_dicom_series}[fmt]
    try:
        checked_volume_header(path, max_voxels)
        array, affine = reader(path)
    except DataError:
        raise
    except Exception as err:  # every library has its own exceptions for a broken file
        raise DataError(
            f"{path}: cannot read this {fmt} volume ({type(err).__name__}: {err}).",
            hint="The file may be truncated or not what its name says; re-export or drop it.",
        ) from err
    return _checked(path, array, affine), affine, {"medmvl_format": fmt}


def _checked(path: Path, array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Shape, dtype and finiteness checks shared by every reader; returns float32."""
    if array.ndim != 3:
        kind = "a 2D image" if array.ndim < 3 else f"a {array.ndim}-D array"
        raise DataError(
            f"{path}: has shape {tuple(array.shape)}, {kind}, not a 3D volume.",
            hint="A 2D image belongs under `image`; for 4-D data select one 3D volume first.",
        )
    if min(array.shape) < 2:
        raise DataError(
            f"{path}: has shape {tuple(array.shape)}: a single slice is a 2D image, not a volume.",
            hint="List single slices under `image`, or give the whole series.",
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise DataError(f"{path}: holds {array.dtype} values, not real numbers.", hint="Save HU as int16 or float32.")
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise DataError(
            f"{path}: {bad} voxels are NaN or infinite.",
            hint="Replace them (for CT, with -1024 HU) or drop the file.",
        )
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: the voxel-to-world matrix is not usable ({affine.tolist()}).",
                        hint="Fix the header's spacing / direction, or save as .npy.")
    return array


def _squeeze_to_3d(array: np.ndarray) -> np.ndarray:
    """Drop singleton dims beyond the third (NIfTI time / component axes of size 1)."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _read_npy(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        array = NumpyReader(allow_pickle=False).read(str(path))
    except ValueError as err:
        raise DataError(
            f"{path}: not a plain numeric .npy array ({err}).",
            hint="Save the volume with numpy.save(path, array) from a numeric array (no pickles).",
        ) from err
    if array.ndim == 4 and array.shape[0] == 1:  # a (1, D, H, W) array with a channel axis
        array = array[0]
    return array, NPY_AFFINE.copy()


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = NibabelReader()
    array, meta = reader.get_data(reader.read(str(path)))  # scl_slope / scl_inter applied
    return _squeeze_to_3d(np.asarray(array)), np.asarray(meta["affine"], dtype=np.float64)


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (a vector "
            "or colour image), not one intensity.",
            hint="Save one scalar channel (HU) per voxel.",
        )
    while image.GetDimension() > 3 and image.GetSize()[-1] == 1:
        index = [slice(None)] * (image.GetDimension() - 1) + [0]
        image = image[tuple(index)]
    array = sitk.GetArrayFromImage(image)  # numpy axes (z, y, x): the reverse of ITK's
    if image.GetDimension() != 3:
        return array, np.eye(4)  # _checked reports the wrong number of dimensions
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    for array_axis, itk_axis in enumerate((2, 1, 0)):
        lps[:3, array_axis] = direction[:, itk_axis] * spacing[itk_axis]
    lps[:3, 3] = image.GetOrigin()
    return array, _LPS_TO_RAS @ lps


# ----------------------------------------------------------------------------------- DICOM


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    slices = _series_slices(folder)
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(shapes) > 1:
        raise DataError(f"{folder}: the slices have different sizes {sorted(shapes)}.",
                        hint="Keep one series, with one image size, in the folder.")
    slices, affine = _order_and_affine(folder, slices)
    planes = []
    for file, ds in slices:
        try:
            pixels = ds.pixel_array
        except Exception as err:
            raise DataError(
                f"{file}: cannot decode the pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}: {err}).",
                hint="Install a decoder (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg) "
                "or convert the series to NIfTI (dcm2niix).",
            ) from err
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        planes.append(pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    return np.stack(planes), affine  # (slice, row, column)


def _series_slices(folder: Path) -> list:
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = source_files(folder)
    images, skipped = [], []
    for file in files:
        if file.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(file)
        except InvalidDicomError:
            skipped.append(file.name)
            continue
        except Exception as err:
            raise DataError(f"{file}: unreadable DICOM file ({err}).", hint="Re-export or remove it.") from err
        if "PixelData" in ds:
            images.append((file, ds))
    if skipped:
        logger.debug("%s: skipped %d files that are not DICOM: %s", folder, len(skipped), skipped[:5])
    if not images:
        subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
        where = f" (it has sub-folders: {', '.join(subdirs[:5])})." if subdirs else "."
        raise DataError(
            f"{folder}: holds no DICOM images{where}",
            hint="Point `image3d` at the folder that directly holds the .dcm files of one series.",
        )
    series: dict[str, list] = {}
    for file, ds in images:
        series.setdefault(str(ds.get("SeriesInstanceUID", "unknown")), []).append((file, ds))
    if len(series) > 1:
        listing = "; ".join(_describe_series(uid, items) for uid, items in series.items())
        raise DataError(
            f"{folder}: holds {len(series)} DICOM series, not one: {listing}.",
            hint="Move each series into its own folder and list the one you mean under `image3d`.",
        )
    (only,) = series.values()
    multi = [file.name for file, ds in only if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise DataError(
            f"{folder}: holds multi-frame (enhanced) DICOM files ({', '.join(multi[:3])}); medmvl reads "
            "series of single-frame slices.",
            hint="Convert the file to NIfTI (e.g. with dcm2niix) and list the .nii.gz instead.",
        )
    if len(only) < 2:
        raise DataError(
            f"{folder}: holds a single DICOM slice ({only[0][0].name}), a 2D image rather than a volume.",
            hint="List a single slice under `image`, or put the whole series in the folder.",
        )
    return only


def _describe_series(uid: str, items: list) -> str:
    file, ds = items[0]
    description = str(ds.get("SeriesDescription", "")) or "no description"
    return f"{uid} ({ds.get('Modality', '?')}, {description!r}, {len(items)} files, e.g. {file.name})"


def _order_and_affine(folder: Path, slices: list) -> tuple[list, np.ndarray]:
    """Sort slices along the slice normal; build the (slice, row, column) -> RAS affine."""
    first = slices[0][1]
    row_spacing, col_spacing = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    has_geometry = all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in slices)
    if not has_geometry:
        logger.warning("%s: slices lack ImagePositionPatient / ImageOrientationPatient; ordering them by "
                       "InstanceNumber and assuming an axial LPS grid.", folder)
        slices = sorted(slices, key=lambda item: int(item[1].get("InstanceNumber", 0) or 0))
        thickness = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
        lps = np.eye(4)  # slice -> superior, row -> posterior, column -> patient's left
        lps[:3, :3] = [[0.0, 0.0, col_spacing], [0.0, row_spacing, 0.0], [thickness, 0.0, 0.0]]
        return slices, _LPS_TO_RAS @ lps

    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in slices])
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise DataError(
            f"{folder}: the slices do not share one orientation (a localizer, or a radial scan?).",
            hint="Keep only the slices of one parallel stack in the folder.",
        )
    row_dir, col_dir = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_dir, col_dir)
    if not math.isclose(float(np.linalg.norm(normal)), 1.0, abs_tol=1e-2):
        raise DataError(f"{folder}: ImageOrientationPatient is not two unit vectors at right angles.",
                        hint="The header is damaged; re-export the series.")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        raise DataError(
            f"{folder}: {int(np.sum(gaps < 1e-3)) + 1} slices share a position: the folder mixes several "
            "acquisitions (echoes, phases or repeats) of one series.",
            hint="Split them into one folder per acquisition.",
        )
    median = float(np.median(gaps))
    if np.max(np.abs(gaps - median)) > 0.1 * median + 1e-2:
        logger.warning("%s: irregular slice spacing (%.3g to %.3g mm, median %.3g); missing slices? "
                       "The volume is treated as evenly spaced.", folder, gaps.min(), gaps.max(), median)
    lps = np.eye(4)
    lps[:3, 0] = (positions[-1] - positions[0]) / (len(slices) - 1)  # keeps a gantry tilt as a shear
    lps[:3, 1] = col_dir * row_spacing  # next row: one row spacing along the column direction
    lps[:3, 2] = row_dir * col_spacing  # next column: one column spacing along the row direction
    lps[:3, 3] = positions[0]
    return slices, _LPS_TO_RAS @ lps
