"""CT-RATE (Hamamci et al. 2024, hub `ibrahimhamamci/CT-RATE`), as published under `dataset/`.

Files read, per split (train / validation):
- `radiology_text_reports/{split}_reports.csv`: `VolumeName`, `Findings_EN`, `Impressions_EN`
  (the file also holds `ClinicalInformation_EN` and `Technique_EN`, not written);
- `metadata/{split}_metadata.csv`: `VolumeName`, `RescaleSlope`, `RescaleIntercept`, `XYSpacing`
  (written "[0.75, 0.75]"), `ZSpacing`;
- the volumes in their nested folders, found from `VolumeName`: the corrected release
  `train_fixed/train_1/train_1_a/train_1_a_1.nii.gz` when present, else the first release
  `train/train_1/...` (`valid_fixed/...`, `valid/...` for validation).

The first release's NIfTI files hold the stored values without the DICOM rescale and with no
reliable spacing, so each volume is rewritten once into `OUT/ct-rate-volumes/<same path>` as int16
HU (stored x slope + intercept from the metadata) with the metadata's spacing in its affine
(directions kept from the source header). A header rescale that disagrees with the metadata drops
the volume; so does a `_fixed` volume whose header lacks the metadata's rescale (whether it holds
HU already cannot be told). A volume already there is not written again. Each report becomes a
report-generation record (`question_type` open): "Findings: ... Impression: ...". The VQA files
(`vqa/*_vqa.json`) are read by `ct_rate_vqa`.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medmvl_cli.data.convert.base import ConvertOptions, Dropped, Media, find_one, text, vqa_record
from medmvl_cli.data.convert.tables import csv_rows

SPLITS = {"train": "train", "validation": "valid"}  # split -> volume folder / name prefix
VOLUME_DIR = "ct-rate-volumes"
NOT_GIVEN = "Not given."  # how the reports CSV writes an absent section
REPORT_PROMPT = "Write the findings and impression of the radiology report for this chest CT."
HINT = "SRC is the CT-RATE folder holding dataset/ (radiology_text_reports/, metadata/, vqa/, train_fixed/ or train/ ...)"


def dataset_dir(src: Path) -> Path:
    return src / "dataset" if (src / "dataset").is_dir() else src


def splits(src: Path, options: ConvertOptions) -> list[str]:
    from medmvl_cli.data.convert import ct_rate_vqa

    base = dataset_dir(src)
    reports = [s for s in SPLITS if (base / "radiology_text_reports" / f"{s}_reports.csv").is_file()]
    return reports + ct_rate_vqa.splits(base)


def rows(src: Path, split: str, media: Media, options: ConvertOptions) -> Iterator:
    from medmvl_cli.data.convert import ct_rate_vqa

    base = dataset_dir(src)
    if split not in SPLITS:
        yield from ct_rate_vqa.rows(base, split, media)
        return
    reports = find_one(base, (f"radiology_text_reports/{split}_reports.csv",), "reports CSV", HINT)
    metadata = load_metadata(base, split)
    for row in csv_rows(reports, ["VolumeName", "Findings_EN", "Impressions_EN"]):
        yield _record(row, base, media, metadata)


def load_metadata(base: Path, split: str) -> dict:
    return _metadata(find_one(base, (f"metadata/{split}_metadata.csv",), "metadata CSV", HINT))


def _section(value) -> str:
    value = text(value)
    return "" if value == NOT_GIVEN else value


def _record(row: dict, base: Path, media: Media, metadata: dict):
    name = text(row["VolumeName"])
    findings, impression = _section(row["Findings_EN"]), _section(row["Impressions_EN"])
    if not findings and not impression:
        return Dropped("empty report")
    rel = hu_volume(name, base, media, metadata)
    if isinstance(rel, Dropped):
        return rel
    report = "\n".join(part for part in (f"Findings: {findings}" if findings else "",
                                          f"Impression: {impression}" if impression else "") if part)
    return vqa_record(f"ct-rate-{name.removesuffix('.nii.gz')}", REPORT_PROMPT, report, "open", volumes=[rel])


def hu_volume(name: str, base: Path, media: Media, metadata: dict) -> str | Dropped:
    """The output-relative path of volume `name` rewritten as HU (written on first use), or why not."""
    nested = find_volume(base, name)
    if nested is None:
        return Dropped("volume missing")
    meta = metadata.get(name)
    if meta is None:
        return Dropped("no metadata row (rescale / spacing unknown)")
    rel = f"{VOLUME_DIR}/{nested}"
    out = media.out_dir / rel
    if not out.exists():
        fixed = nested.split("/", 1)[0].endswith("_fixed")
        if not write_hu_volume(base / nested, out, *meta, header_must_match=fixed):
            return Dropped("_fixed volume whose header rescale is not the metadata CSV's" if fixed
                           else "NIfTI header rescale differs from the metadata CSV's")
    return rel


def find_volume(base: Path, name: str) -> str | None:
    """The path under `base` of volume `name`: the `_fixed` folder first, then the first release's."""
    nested = nested_path(name)
    if nested is None:
        return None
    for candidate in (nested.replace("/", "_fixed/", 1), nested):
        if (base / candidate).is_file():
            return candidate
    return None


def nested_path(name: str) -> str | None:
    """`train_1_a_1.nii.gz` -> `train/train_1/train_1_a/train_1_a_1.nii.gz`."""
    parts = name.removesuffix(".nii.gz").split("_")
    if len(parts) != 4 or not name.endswith(".nii.gz") or parts[0] not in SPLITS.values() or not all(parts):
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


def write_hu_volume(source: Path, out: Path, slope: float, intercept: float, spacing: tuple[float, float, float],
                    header_must_match: bool = False) -> bool:
    """Rewrite `source` as int16 HU with `spacing` (mm per array axis), atomically; False (nothing
    written) when its header's rescale forbids it.

    The metadata's slope / intercept apply to the stored values. A header that carries a rescale
    of its own must agree with them: applying both would shift the volume twice. With
    `header_must_match` (the corrected `_fixed` release, whose headers carry the rescale) a header
    without one is refused too, unless the metadata's rescale is the identity."""
    import nibabel as nib

    img = nib.load(str(source))
    # nibabel moves the header's scl_slope / scl_inter onto the data proxy when it loads
    in_header = [float(getattr(img.dataobj, "slope", 1.0)), float(getattr(img.dataobj, "inter", 0.0))]
    if not np.allclose(in_header, [slope, intercept]) and (header_must_match or not np.allclose(in_header, [1.0, 0.0])):
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
