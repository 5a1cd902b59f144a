"""`medmvl data convert`: public medical VQA / report datasets, as published, to MedM-VL records.

One module per dataset; `CONVERTERS` maps the command's DATASET names to them.
"""

from __future__ import annotations

from medmvl_cli.data.convert import ct_rate, hf_parquet, m3d, pathvqa, pmc_vqa, slake, vqa_rad
from medmvl_cli.data.convert.base import ConvertOptions
from medmvl_cli.data.convert.run import Converter, ConvertReport, convert
from medmvl_cli.errors import DataError

CONVERTERS: dict[str, Converter] = {
    c.name: c
    for c in (
        Converter("vqa-rad", "VQA-RAD: the OSF JSON + image folder, or the hub parquet release", vqa_rad.splits, vqa_rad.rows),
        Converter("slake", "SLAKE: train / validate / test JSON + imgs/ (--lang en | zh | all)", slake.splits, slake.rows),
        Converter("pathvqa", "PathVQA: the hub parquet release (the pickled release is refused)", pathvqa.splits, pathvqa.rows),
        Converter("pmc-vqa", "PMC-VQA: split CSVs + images/ -> four-way choice questions", pmc_vqa.splits, pmc_vqa.rows),
        Converter("m3d-vqa", "M3D-VQA: split CSVs -> a choice and an open question per row (3D)", m3d.vqa_splits, m3d.vqa_rows),
        Converter("m3d-cap", "M3D-Cap: M3D_Cap.json image / report pairs -> report generation (3D)", m3d.cap_splits, m3d.cap_rows),
        Converter("ct-rate", "CT-RATE: reports + metadata CSVs + nested NIfTI -> HU volumes, report generation", ct_rate.splits, ct_rate.rows),
        Converter("hf", "any HF datasets folder or parquet shards (--image-column / --question-column / --answer-column)", hf_parquet.splits, hf_parquet.rows),
    )
}


def get_converter(name: str) -> Converter:
    try:
        return CONVERTERS[name]
    except KeyError:
        raise DataError(f"no converter for dataset {name!r}", hint=f"choose one of {', '.join(CONVERTERS)}") from None


__all__ = ["CONVERTERS", "ConvertOptions", "ConvertReport", "convert", "get_converter"]
