"""Which files are images, volumes or DICOM: the suffix lists and the DICOM test, written once.

Light on purpose (no pydicom, MONAI or torch import): the CLI, the demo and the validator ask
before they decide which reader to load.
"""

from __future__ import annotations

from pathlib import Path

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + DICOM_SUFFIXES
# Single-file 3D formats (a DICOM series is a folder).
VOLUME_SUFFIXES = (".npy", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def is_dicom(path: Path) -> bool:
    """A DICOM file: a .dcm / .dicom name, or the "DICM" magic after the 128-byte preamble
    (the test pydicom's `is_dicom` makes, without importing pydicom)."""
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False
