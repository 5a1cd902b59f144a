"""VQA-RAD, in either published layout.

- The OSF release (Lau et al. 2018): `VQA_RAD Dataset Public.json`, a JSON list of ~2,250 questions
  (read whole: it is about 1 MB), and `VQA_RAD Image Folder/` with the images. Read per question:
  `qid`, `image_name`, `question`, `answer` (sometimes a number), `answer_type` (CLOSED / OPEN,
  sometimes with stray spaces or lower case) and `phrase_type`: `test_freeform` / `test_para`
  questions are the test split, the others train.
- The parquet release (hub `flaviagiammarino/vqa-rad`): `data/train-*.parquet`,
  `data/test-*.parquet` with `image` ({bytes, path}), `question`, `answer`. It has no answer
  type: yes / no answers are closed, as its card says.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medmvl_cli.data.convert import hf_parquet
from medmvl_cli.data.convert.base import ConvertOptions, Dropped, Media, find_one, load_json, text, vqa_record

NAME = "vqa-rad"
JSON_PATTERNS = ("VQA_RAD Dataset Public.json", "*/VQA_RAD Dataset Public.json")
IMAGE_DIR_PATTERNS = ("VQA_RAD Image Folder", "*/VQA_RAD Image Folder")
TEST_PHRASES = ("test_freeform", "test_para")
_PARQUET = ConvertOptions(image_column="image", question_column="question", answer_column="answer")


def splits(src: Path, options: ConvertOptions) -> list[str]:
    if _is_parquet(src):
        return hf_parquet.splits(src, _PARQUET)
    return ["train", "test"]


def rows(src: Path, split: str, media: Media, options: ConvertOptions) -> Iterator:
    if _is_parquet(src):
        yield from hf_parquet.rows(src, split, media, _PARQUET, prefix=NAME)
        return
    questions = load_json(find_one(src, JSON_PATTERNS, "VQA-RAD JSON", "download `VQA_RAD Dataset Public.json` from the OSF page"), list)
    image_dir = find_one(src, IMAGE_DIR_PATTERNS, "image folder", "unzip `VQA_RAD Image Folder` next to the JSON")
    root = media.link("vqa-rad-images", image_dir)
    for item in questions:
        if (text(item.get("phrase_type")) in TEST_PHRASES) != (split == "test"):
            continue
        yield _record(item, image_dir, root)


def _record(item: dict, image_dir: Path, root: str):
    question, answer, image = text(item.get("question")), text(item.get("answer")), text(item.get("image_name"))
    qtype = text(item.get("answer_type")).lower()
    if not question:
        return Dropped("empty question")
    if not answer:
        return Dropped("empty answer")
    if qtype not in ("closed", "open"):
        return Dropped("answer_type not CLOSED / OPEN")
    if not image or not (image_dir / image).is_file():
        return Dropped("image missing")
    return vqa_record(f"{NAME}-{item.get('qid')}", question, answer, qtype, images=[f"{root}/{image}"])


def _is_parquet(src: Path) -> bool:
    return src.suffix == ".parquet" or any(src.rglob("*.parquet"))
