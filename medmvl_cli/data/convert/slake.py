"""SLAKE (Liu et al. 2021), as published (`Slake1.0/`, also the hub's `BoKelvin/SLAKE`).

Files read: `train.json`, `validate.json`, `test.json` -- JSON lists (the largest about 10k
questions, read whole) -- and the images under `imgs/` (`imgs/xmlab102/source.jpg`). Per question:
`qid`, `img_name` (relative to `imgs/`), `question`, `answer`, `answer_type` (OPEN / CLOSED) and
`q_lang` (`en` / `zh`). English only by default; `--lang zh` or `--lang all`. The split
`validate.json` (renamed `validation.json` in the hub copy; either is read) is written as
`validation.json`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medmvl_cli.data.convert.base import ConvertOptions, Dropped, Media, find_one, load_json, text, vqa_record

NAME = "slake"
FILES = {"train": ("train.json",), "validation": ("validate.json", "validation.json"), "test": ("test.json",)}


def splits(src: Path, options: ConvertOptions) -> list[str]:
    return [s for s, names in FILES.items() if any(list(src.glob(n)) or list(src.glob(f"*/{n}")) for n in names)]


def rows(src: Path, split: str, media: Media, options: ConvertOptions) -> Iterator:
    hint = "SRC is the unzipped Slake1.0 folder (train.json, validate.json, test.json, imgs/)"
    path = find_one(src, [p for n in FILES[split] for p in (n, f"*/{n}")], " or ".join(FILES[split]), hint)
    image_dir = find_one(path.parent, ("imgs",), "imgs/ folder", hint)
    root = media.link("slake-imgs", image_dir)
    for item in load_json(path, list):
        lang = text(item.get("q_lang")).lower()
        if options.lang != "all" and lang != options.lang:
            yield Dropped(f"q_lang {lang or 'missing'} (not --lang {options.lang})")
            continue
        question, answer, image = text(item.get("question")), text(item.get("answer")), text(item.get("img_name"))
        qtype = text(item.get("answer_type")).lower()
        if not question or not answer:
            yield Dropped("empty question or answer")
        elif qtype not in ("closed", "open"):
            yield Dropped("answer_type not CLOSED / OPEN")
        elif not image or not (image_dir / image).is_file():
            yield Dropped("image missing")
        else:
            yield vqa_record(f"{NAME}-{item.get('qid')}", question, answer, qtype,
                             images=[f"{root}/{image}"], lang=lang)
