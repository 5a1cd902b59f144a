"""PMC-VQA (Zhang et al. 2023), as published on the hub (`xmcmic/PMC-VQA`).

Files read: the split CSVs `train.csv`, `test.csv`, `test_clean.csv` (version 2: `train_2.csv`,
`test_2.csv`; each split is named after its file) and the images unzipped from `images.zip`
(`images/` holding `Figure_path`; version 2's `images_2.zip` is looked up the same way under
`figures/`). Columns: `Figure_path`, `Question`, `Answer` (spelt `Anwser` in the first card),
`Choice A` .. `Choice D` (written "A:Diffuse uptake pattern"), `Answer_label` (A-D).

Each row becomes a choice question in M3D-Bench's form -- "Q Choices: A. x B. y C. z D. w",
answer "B. Focal uptake pattern" -- scored by `medmvl eval`'s choice accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from medmvl_cli.data.convert.base import (
    CHOICE_LETTERS,
    ConvertOptions,
    Dropped,
    Media,
    choice_question,
    text,
    vqa_record,
)
from medmvl_cli.data.convert.tables import csv_rows

NAME = "pmc-vqa"
SPLIT_FILES = ("train", "test", "test_clean", "train_2", "test_2")
IMAGE_DIRS = ("images", "figures", "images_2", "images/figures", "images_2/figures")
_CHOICE_PREFIX = re.compile(r"^\s*[A-Da-d]\s*[:.)]\s*")


def splits(src: Path, options: ConvertOptions) -> list[str]:
    return [s for s in SPLIT_FILES if (src / f"{s}.csv").is_file()]


def rows(src: Path, split: str, media: Media, options: ConvertOptions) -> Iterator:
    path = src / f"{split}.csv"
    dirs = [src / d for d in IMAGE_DIRS if (src / d).is_dir()]
    links = {d: media.link(f"pmc-vqa-{d.relative_to(src).as_posix().replace('/', '-')}", d) for d in dirs}
    required = ["Figure_path", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    for index, row in enumerate(csv_rows(path, required)):
        yield _record(row, index, split, links)


def _record(row: dict, index: int, split: str, links: dict):
    question, label = text(row["Question"]), text(row["Answer_label"]).upper()
    choices = [_CHOICE_PREFIX.sub("", text(row[f"Choice {c}"])) for c in CHOICE_LETTERS]
    if not question:
        return Dropped("empty question")
    if len(label) != 1 or label not in CHOICE_LETTERS or not choices[CHOICE_LETTERS.index(label)]:
        return Dropped("Answer_label not one of A-D with a choice text")
    image = _image(text(row["Figure_path"]), links)
    if image is None:
        return Dropped("image missing")
    answer = f"{label}. {choices[CHOICE_LETTERS.index(label)]}"
    return vqa_record(f"{NAME}-{split}-{index}", choice_question(question, choices), answer, "choice",
                      images=[image])


def _image(name: str, links: dict) -> str | None:
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    for folder, link in links.items():
        if (folder / name).is_file():
            return f"{link}/{name}"
    return None
