"""Hostile files built cheaply: headers that declare huge images / volumes over tiny bodies.

Each writer produces a file a real reader accepts up to its header (valid magic, valid fields), so
a reader that decoded before checking the declared size would try to allocate gigabytes.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

GIANT = (1024, 1024, 1024)  # 1024³ int16: 2 GiB decoded, 4 GiB as float32


def nifti(path: Path, shape=GIANT, body_bytes: int = 4096) -> Path:
    """A NIfTI-1 file (gzipped for a .gz name) declaring int16 `shape`, with `body_bytes` of zeros."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header.binaryblock + b"\0" * 4)  # no extensions
        fh.write(b"\0" * body_bytes)
    return path


def nrrd(path: Path, sizes=GIANT) -> Path:
    """A gzip-encoded NRRD declaring short voxels of `sizes` (x y z)."""
    head = ("NRRD0004\ntype: short\ndimension: 3\n"
            f"sizes: {' '.join(map(str, sizes))}\nencoding: gzip\nendian: little\n\n")
    path.write_bytes(head.encode() + gzip.compress(b"\0" * 4096))
    return path


def mha(path: Path, sizes=GIANT) -> Path:
    """A MetaImage (.mha) declaring short voxels of `sizes`, compressed body."""
    body = zlib.compress(b"\0" * 4096)
    head = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            f"CompressedData = True\nCompressedDataSize = {len(body)}\n"
            f"DimSize = {' '.join(map(str, sizes))}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    path.write_bytes(head.encode() + body)
    return path


def npy(path: Path, shape=GIANT) -> Path:
    """A .npy header declaring int16 `shape` over a few bytes of data."""
    from numpy.lib import format as npy_format

    with open(path, "wb") as fh:
        npy_format.write_array_header_1_0(fh, {"descr": "<i2", "fortran_order": False, "shape": tuple(shape)})
        fh.write(b"\0" * 4096)
    return path


def dicom_series(folder: Path, slices: int = 3, rows: int = 16384, columns: int = 16384) -> Path:
    """A folder of `slices` CT files whose tags declare rows x columns 16-bit pixels each; each
    holds the pixel data of a 2 x 2 slice."""
    import pydicom

    from tests.unit.test_volume_io import write_ct_series

    write_ct_series(folder, np.zeros((slices, 2, 2)))
    for file in folder.iterdir():
        ds = pydicom.dcmread(file)
        ds.Rows, ds.Columns = rows, columns
        ds.save_as(file, enforce_file_format=True)
    return folder


def dicom(path: Path, rows: int = 30000, columns: int = 30000) -> Path:
    """One CT slice declaring rows x columns pixels (a 2D image for `image`)."""
    (only,) = dicom_series(path.parent / f".{path.name}.d", slices=1, rows=rows, columns=columns).iterdir()
    only.rename(path)
    only.parent.rmdir()
    return path


def png(path: Path, width: int = 50000, height: int = 50000) -> Path:
    """A PNG whose IHDR declares width x height 8-bit grey pixels; the image data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))
    return path
