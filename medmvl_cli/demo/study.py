"""An uploaded file, checked against the model and opened for viewing: a 2D image or a 3D volume.

What a file is follows from its name, as everywhere in medmvl: image suffixes are 2D, volume
suffixes are 3D, a ``.zip`` holds one DICOM series (or one volume file with its data file, for
``.mhd`` + ``.raw``), and a file without a known suffix is tried as a single DICOM image (PACS
exports often have no extension). The model reads the same path later through
``Predictor`` — the viewer's copy is only for looking at.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from medmvl_cli.constants import BRANCH_PLACEHOLDERS
from medmvl_cli.data.file_kinds import IMAGE_SUFFIXES, VOLUME_SUFFIXES, is_dicom
from medmvl_cli.data.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS, TooLargeError
from medmvl_cli.demo.viewer import DisplayVolume, to_display
from medmvl_cli.errors import DataError, MedmvlError

logger = logging.getLogger(__name__)

ACCEPTED = ("2D images: PNG, JPEG, BMP, TIFF or a single DICOM slice. 3D volumes: NIfTI (.nii, .nii.gz), "
            "NRRD, MHA, .npy (HU, D×H×W), or a .zip of one DICOM series.")
TOO_LARGE_HINT = ("Upload a downsampled copy, or restart the demo with a larger `--max-voxels` (volumes) / "
                  "`--max-pixels` (images).")
# A zip may unpack to more than it weighs; DICOM compresses 2-3x.
UNZIPPED_FACTOR = 4
KIND_WORDS = {"image": "a 2D image", "image3d": "a 3D volume"}


class UploadError(DataError):
    """A file the demo cannot take; ``message`` names it (by its upload name) and ``hint`` says what to do."""

    title = "Cannot use this file"


@dataclass
class Study:
    """One uploaded file, ready to show and to ask about."""

    kind: str  # "image" (2D) or "image3d" (3D)
    name: str  # the file name the user uploaded
    path: Path  # what the model reads: the file, or the folder a zip was unpacked into
    picture: Image.Image | None = None  # 2D: the image as the model's reader gives it
    volume: DisplayVolume | None = None  # 3D: the volume reoriented for display
    workdir: Path | None = field(default=None, repr=False)  # our temporary folder, if any

    @property
    def placeholder(self) -> str:
        return BRANCH_PLACEHOLDERS[self.kind]

    def summary(self) -> str:
        if self.volume is not None:
            d, h, w = self.volume.shape
            sd, sh, sw = self.volume.spacing
            lo, hi = self.volume.value_range()
            return (f"**{self.name}** — 3D volume: {d} axial slices of {h} × {w} voxels, "
                    f"voxel {sw:.2g} × {sh:.2g} × {sd:.2g} mm, values {lo:.0f} to {hi:.0f}")
        assert self.picture is not None
        return f"**{self.name}** — 2D image: {self.picture.width} × {self.picture.height} px"

    def close(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def file_kind(path: Path) -> str:
    """``image``, ``image3d`` or ``zip`` from the name (and, with no known suffix, the DICOM magic)."""
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(VOLUME_SUFFIXES):
        return "image3d"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if is_dicom(path):
        return "image"
    raise UploadError(f"{path.name}: not a file type the demo reads.", hint=ACCEPTED)


def open_study(path: str | Path, branches: tuple[str, ...], max_bytes: int,
               image_window: tuple[float, float] | None = None, tmp_root: Path | None = None,
               name: str | None = None, max_voxels: int = DEFAULT_MAX_VOXELS,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Study:
    """Check an uploaded file against the size limits and the model's branches, then read it
    (a volume over ``max_voxels`` / an image over ``max_pixels`` is refused from its header).

    ``branches`` holds ``image`` and / or ``image3d``. Raises ``UploadError`` with a message
    that names the file as the user knows it (``name``, default the file's own name).
    """
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise UploadError(f"{name}: the upload did not arrive (no such file).", hint="Upload it again.")
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadError(
            f"{name} is {_mb(size)}, over this demo's upload limit of {_mb(max_bytes)}.",
            hint="Restart the demo with a larger `--max-upload-mb`, or upload a cropped / downsampled copy.",
        )
    kind = file_kind(path)
    wanted = "image3d" if kind == "zip" else kind
    if wanted not in branches:
        raise UploadError(_wrong_branch_message(name, wanted, branches), hint=_wrong_branch_hint(branches))
    if path.name.lower().endswith(".mhd"):
        raise UploadError(f"{name}: an .mhd header needs its data file beside it.",
                          hint="Zip the .mhd with its .raw / .zraw file and upload the .zip, or use .mha / .nii.gz.")
    workdir = Path(tempfile.mkdtemp(prefix="medmvl-demo-", dir=tmp_root)) if kind == "zip" else None
    try:
        if kind == "image":
            return _open_image(path, name, image_window, max_pixels)
        volume_path = path if workdir is None else _unzip_series(path, name, workdir, max_bytes * UNZIPPED_FACTOR)
        return _open_volume(volume_path, name, workdir, max_voxels)
    except BaseException as err:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(err, MedmvlError) and not isinstance(err, UploadError):
            # The readers name temporary paths and give annotation-file advice; say it the demo's way.
            message = err.message.replace(str(path), name)
            for folder in (workdir, path.parent):
                if folder is not None:
                    message = message.replace(str(folder) + "/", "").replace(str(folder), name)
            hint = TOO_LARGE_HINT if isinstance(err, TooLargeError) else ACCEPTED
            raise UploadError(message, hint=hint) from err
        raise


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f} MB" if n_bytes >= 2**20 else f"{n_bytes / 2**20:.2f} MB"


def _wrong_branch_message(name: str, wanted: str, branches: tuple[str, ...]) -> str:
    reads = " and ".join(KIND_WORDS[b].split(" ", 1)[1] + "s" for b in branches) or "nothing"
    only = " only" if len(branches) == 1 else ""
    return f"{name} is {KIND_WORDS[wanted]}, but this model reads {reads}{only}."


def _wrong_branch_hint(branches: tuple[str, ...]) -> str:
    if branches == ("image",):
        return ("Upload a 2D image (PNG, JPEG or a DICOM slice), or restart the demo on a model with a 3D "
                "branch (`medmvl demo --model RUN_DIR`).")
    return ("Upload a 3D volume (NIfTI, NRRD, MHA, .npy or a .zip of a DICOM series), or restart the demo "
            "on a model with a 2D branch (`medmvl demo --model RUN_DIR`).")


def _open_image(path: Path, name: str, window: tuple[float, float] | None, max_pixels: int) -> Study:
    from medmvl_cli.data.image_io import read_image

    return Study(kind="image", name=name, path=path, picture=read_image(path, window=window, max_pixels=max_pixels))


def _open_volume(path: Path, name: str, workdir: Path | None, max_voxels: int) -> Study:
    from medmvl_cli.data.volume_io import read_volume

    volume = read_volume(path, max_voxels)
    display = to_display(volume.numpy(), volume.affine.numpy())
    return Study(kind="image3d", name=name, path=path, volume=display, workdir=workdir)


def _unzip_series(path: Path, name: str, dest: Path, max_unzipped: int) -> Path:
    """Unpack a zip into ``dest``; return the one volume file it holds, else the one folder of files."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and not _ignored(Path(m.filename))]
            total = sum(m.file_size for m in members)
            if total > max_unzipped:
                raise UploadError(f"{name} unpacks to {_mb(total)}, over the limit of {_mb(max_unzipped)}.",
                                  hint="Restart the demo with a larger `--max-upload-mb`, or zip fewer slices.")
            for member in members:
                archive.extract(member, dest)  # zipfile drops absolute paths and `..` from member names
    except zipfile.BadZipFile as err:
        raise UploadError(f"{name}: not a readable zip file ({err}).", hint="Zip the series folder again.") from err
    files = [p for p in dest.rglob("*") if p.is_file() and not _ignored(p.relative_to(dest))]
    if not files:
        raise UploadError(f"{name}: the zip holds no files.", hint="Zip the folder that holds the series' .dcm files.")
    volumes = [p for p in files if p.name.lower().endswith(VOLUME_SUFFIXES)]
    if len(volumes) == 1:
        return volumes[0]
    if len(volumes) > 1:
        listing = ", ".join(str(p.relative_to(dest)) for p in volumes[:5])
        raise UploadError(f"{name}: the zip holds {len(volumes)} volume files ({listing}); the demo reads one.",
                          hint="Upload one volume at a time.")
    folders = sorted({p.parent for p in files if p.name.upper() != "DICOMDIR"})
    if len(folders) > 1:
        listing = ", ".join(str(f.relative_to(dest)) or "." for f in folders[:5])
        raise UploadError(
            f"{name}: the zip holds files in {len(folders)} folders ({listing}); the demo reads one DICOM series.",
            hint="Zip the folder of one series (the one holding its .dcm files).",
        )
    if not folders:
        raise UploadError(f"{name}: the zip holds only a DICOMDIR.", hint="Zip the folder holding the .dcm files.")
    return folders[0]


def _ignored(relative: Path) -> bool:
    """macOS resource forks and hidden files that zips made on a Mac carry along."""
    return any(part == "__MACOSX" or part.startswith(".") for part in relative.parts)
