"""M3D-VQA and M3D-Cap (Bai et al. 2024, hub `GoodBaiBai88/M3D-VQA`, `GoodBaiBai88/M3D-Cap`), in the
layout M3D's own training code reads (`LaMed/src/dataset/multi_dataset.py`): SRC is M3D's data
root, and every path in the CSV / JSON is relative to it (`M3D_Cap_npy/ct_case/.../x.npy`, 1 x D x
H x W arrays normalised to 0-1; recipes window them with [0, 1]).

M3D-VQA: `M3D_VQA_train.csv`, `M3D_VQA_val.csv`, `M3D_VQA_test.csv`, `M3D_VQA_test5k.csv`
(anywhere under SRC) with `Image Path`, `Question Type` (plane, phase, organ, abnormality,
location: kept as `category`), `Question`, `Choice A` .. `Choice D`, `Answer`, `Answer Choice`.
Each row gives M3D-Bench's two questions: a choice question "Q Choices: A. .. D. .." answered
"B. text", and the open question answered with `Answer`.

M3D-Cap: `M3D_Cap.json`, {"train": [...], "validation": [...], "test": [...]} of
{"image": npy path, "text": report .txt path}; read whole (a few MB of paths). Each pair becomes
a report-generation record, the report read from its text file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medmvl_cli.data.convert.base import (
    CHOICE_LETTERS,
    ConvertOptions,
    Dropped,
    Media,
    choice_question,
    find_one,
    load_json,
    text,
    vqa_record,
)
from medmvl_cli.data.convert.tables import csv_rows

VQA_FILES = {"train": "M3D_VQA_train.csv", "validation": "M3D_VQA_val.csv", "test": "M3D_VQA_test.csv",
             "test5k": "M3D_VQA_test5k.csv"}
CAP_FILE = "M3D_Cap.json"
CAPTION_PROMPT = "Please write a radiology report for this CT scan."
ROOT_LINK = "m3d-data"


def _safe(rel: str, src: Path) -> bool:
    return bool(rel) and not Path(rel).is_absolute() and ".." not in Path(rel).parts and (src / rel).is_file()


# ----------------------------------------------------------------------------------------- VQA
def vqa_splits(src: Path, options: ConvertOptions) -> list[str]:
    return [s for s, name in VQA_FILES.items() if any(src.rglob(name))]


def vqa_rows(src: Path, split: str, media: Media, options: ConvertOptions) -> Iterator:
    path = find_one(src, (f"**/{VQA_FILES[split]}",), VQA_FILES[split], "SRC is M3D's data root")
    root = media.link(ROOT_LINK, src)
    required = ["Image Path", "Question Type", "Question", *(f"Choice {c}" for c in CHOICE_LETTERS), "Answer", "Answer Choice"]
    for index, row in enumerate(csv_rows(path, required)):
        yield _vqa_pair(row, f"m3d-vqa-{split}-{index}", src, root)


def _vqa_pair(row: dict, rid: str, src: Path, root: str):
    volume, question, answer = text(row["Image Path"]), text(row["Question"]), text(row["Answer"])
    letter = text(row["Answer Choice"]).upper()
    if not question or not answer:
        return Dropped("empty question or answer")
    if len(letter) != 1 or letter not in CHOICE_LETTERS:
        return Dropped("Answer Choice not one of A-D")
    if not _safe(volume, src):
        return Dropped("volume missing")
    category = text(row["Question Type"])
    choices = [text(row[f"Choice {c}"]) for c in CHOICE_LETTERS]
    volumes = [f"{root}/{volume}"]
    return [
        vqa_record(f"{rid}-choice", choice_question(question, choices), f"{letter}. {answer}", "choice",
                   volumes=volumes, category=category),
        vqa_record(f"{rid}-open", question, answer, "open", volumes=volumes, category=category),
    ]


# ------------------------------------------------------------------------------------- captions
def _cap_index(src: Path) -> dict:
    path = find_one(src, (CAP_FILE, f"**/{CAP_FILE}"), CAP_FILE, "SRC is M3D's data root (holding M3D_Cap.json)")
    return load_json(path, dict)


def cap_splits(src: Path, options: ConvertOptions) -> list[str]:
    return [s for s, items in _cap_index(src).items() if isinstance(items, list)]


def cap_rows(src: Path, split: str, media: Media, options: ConvertOptions) -> Iterator:
    root = media.link(ROOT_LINK, src)
    for index, item in enumerate(_cap_index(src)[split]):
        volume = text(item.get("image")) if isinstance(item, dict) else ""
        report = text(item.get("text")) if isinstance(item, dict) else ""
        if not _safe(volume, src):
            yield Dropped("volume missing")
        elif not _safe(report, src):
            yield Dropped("report text file missing")
        else:
            caption = (src / report).read_text(encoding="utf-8", errors="replace").strip()
            yield (vqa_record(f"m3d-cap-{split}-{index}", CAPTION_PROMPT, caption, "open", volumes=[f"{root}/{volume}"])
                   if caption else Dropped("empty report"))
