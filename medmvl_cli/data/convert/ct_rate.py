"""CT-RATE (Hamamci et al. 2024, hub `ibrahimhamamci/CT-RATE`), as published under `dataset/`.

Files read, per split (train / validation):
- `radiology_text_reports/{split}_reports.csv`: `VolumeName`, `Findings_EN`, `Impressions_EN`;
- `metadata/{split}_metadata.csv`: `VolumeName`, `RescaleSlope`, `RescaleIntercept`, `XYSpacing`
  (written "[0.75, 0.75]"), `ZSpacing`;
- the volumes in their nested folders: `train/train_1/train_1_a/train_1_a_1.nii.gz`
  (`valid/valid_1/...` for validation), found from `VolumeName`.

The published NIfTI files hold the stored values without the DICOM rescale and with no reliable
spacing, so each volume is rewritten once into `OUT/ct-rate-volumes/<same nested path>` as int16
HU (stored x slope + intercept from the metadata) with the metadata's spacing in its affine
(directions kept from the source header); a header rescale that disagrees with the metadata drops
the volume. A volume already there is not written again. Each
report becomes a report-generation record (`question_type` open): "Findings: ... Impression: ...".
The VQA files some CT-RATE releases add are not read yet.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from medmvl_cli.data.convert.base import ConvertOptions, Dropped, Media, find_one, text, vqa_record
from medmvl_cli.data.convert.tables import csv_rows

SPLITS = {"train": "train", "validation": "valid"}  # split -> volume folder / name prefix
VOLUME_DIR = "ct-rate-volumes"
REPORT_PROMPT = "Write the findings and impression of the radiology report for this chest CT."
_HINT = "SRC is the CT-RATE folder holding dataset/ (radiology_text_reports/, metadata/, train/ or valid/)"


def _dataset_dir(src: Path) -> Path:
    return src / "dataset" if (src / "dataset").is_dir() else src


def splits(src: Path, options: ConvertOptions) -> list[str]:
    base = _dataset_dir(src)
    return [s for s in SPLITS if (base / "radiology_text_reports" / f"{s}_reports.csv").is_file()]


def rows(src: Path, split: str, media: Media, options: ConvertOptions) -> Iterator:
    base = _dataset_dir(src)
    reports = find_one(base, (f"radiology_text_reports/{split}_reports.csv",), "reports CSV", _HINT)
    metadata = _metadata(find_one(base, (f"metadata/{split}_metadata.csv",), "metadata CSV", _HINT))
    for row in csv_rows(reports, ["VolumeName", "Findings_EN", "Impressions_EN"]):
        yield _record(row, base, media, metadata)


def _record(row: dict, base: Path, media: Media, metadata: dict):
    name = text(row["VolumeName"])
    findings, impression = text(row["Findings_EN"]), text(row["Impressions_EN"])
    if not findings and not impression:
        return Dropped("empty report")
    nested = nested_path(name)
    if nested is None or not (base / nested).is_file():
        return Dropped("volume missing")
    meta = metadata.get(name)
    if meta is None:
        return Dropped("no metadata row (rescale / spacing unknown)")
    rel = f"{VOLUME_DIR}/{nested}"
    out = media.out_dir / rel
    if not out.exists() and not write_hu_volume(base / nested, out, *meta):
        return Dropped("NIfTI header rescale differs from the metadata CSV's")
    report = "\n".join(part for part in (f"Findings: {findings}" if findings else "",
                                          f"Impression: {impression}" if impression else "") if part)
    return vqa_record(f"ct-rate-{name.removesuffix('.nii.gz')}", REPORT_PROMPT, report, "open", volumes=[rel])


def nested_path(name: str) -> Optional[str]:
    """`train_1_a_1.nii.gz` -> `train/train_1/train_1_a/train_1_a_1.nii.gz`."""
    parts = name.removesuffix(".nii.gz").split("_")
    if len(parts) != 4 or not name.endswith(".nii.gz") or parts[0] not in SPLITS.values():
        return None
    return f"{parts[0]}/{'_'.join(parts[:2])}/{'_'.join(parts[:3])}/{name}"


def _metadata(path: Path) -> dict[str, tuple[float, float, tuple[float, float, float]]]:
    """VolumeName -> (slope, intercept, spacing along the array's three axes)."""
    out = {}
    for row in csv_rows(path, ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"]):
        try:
            xy = ast.literal_eval(text(row["XYSpacing"]))
            spacing = (float(xy[0]), float(xy[1]), float(row["ZSpacing"]))
            out[text(row["VolumeName"])] = (float(row["RescaleSlope"]), float(row["RescaleIntercept"]), spacing)
        except (ValueError, SyntaxError, TypeError, IndexError):
            continue  # the volume is then dropped with "no metadata row"
    return out


def write_hu_volume(source: Path, out: Path, slope: float, intercept: float, spacing: tuple[float, float, float]) -> bool:
    """Rewrite `source` as int16 HU with `spacing` (mm per array axis), atomically.

    The metadata's slope / intercept apply to the stored values. A header that carries a rescale
    of its own must agree with them (False, nothing written, when it does not): applying both
    would shift the volume twice."""
    import nibabel as nib

    img = nib.load(str(source))
    # nibabel moves the header's scl_slope / scl_inter onto the data proxy when it loads
    in_header = [float(getattr(img.dataobj, "slope", 1.0)), float(getattr(img.dataobj, "inter", 0.0))]
    if not np.allclose(in_header, [1.0, 0.0]) and not np.allclose(in_header, [slope, intercept]):
        return False
    stored = np.asarray(img.dataobj.get_unscaled(), dtype=np.float32)
    hu = np.clip(np.rint(stored * np.float32(slope) + np.float32(intercept)), -32768, 32767).astype(np.int16)
    directions = img.affine[:3, :3] / np.where(np.linalg.norm(img.affine[:3, :3], axis=0) > 0,
                                               np.linalg.norm(img.affine[:3, :3], axis=0), 1.0)
    affine = img.affine.copy()
    affine[:3, :3] = directions * np.asarray(spacing)
    fixed = nib.Nifti1Image(hu, affine)
    fixed.header.set_xyzt_units("mm")
    fixed.set_qform(affine, code=1)
    fixed.set_sform(affine, code=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name.removesuffix('.nii.gz')}.tmp.nii.gz")
    try:
        nib.save(fixed, str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return True
