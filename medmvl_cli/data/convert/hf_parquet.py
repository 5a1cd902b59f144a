"""Any Hugging Face dataset on disk: parquet shards (`data/train-00000-of-00001.parquet`, or the hub's
`default/train/0000.parquet`) or a `datasets.save_to_disk` folder (`train/data-00000-of-00001.arrow`).

Columns are named on the command line (defaults `image`, `question`, `answer`). An image cell is
either the `datasets.Image` struct `{bytes, path}` -- the bytes are written out once, named by
their SHA-256 -- or a path relative to SRC. `--question-type-column` reads closed / open / choice
from the data; without it yes / no answers are closed, the others open.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medmvl_cli.data.convert.base import ConvertOptions, Dropped, Media, text, vqa_record, yes_no_type
from medmvl_cli.data.convert.tables import table_rows, table_shards
from medmvl_cli.errors import DataError

NAME = "hf"
_TYPES = {"closed": "closed", "open": "open", "choice": "choice", "yes/no": "closed"}


def _columns(options: ConvertOptions) -> tuple[str, str, str, str | None]:
    return (options.image_column or "image", options.question_column or "question",
            options.answer_column or "answer", options.question_type_column)


def splits(src: Path, options: ConvertOptions) -> list[str]:
    shards = table_shards(src)
    if not shards:
        raise DataError(f"{src}: no parquet or arrow files",
                        hint="give the dataset folder (with data/<split>-*.parquet or <split>/*.arrow) or a parquet file")
    return list(shards)


def rows(src: Path, split: str, media: Media, options: ConvertOptions, prefix: str = NAME) -> Iterator:
    image_col, question_col, answer_col, type_col = _columns(options)
    columns = [image_col, question_col, answer_col] + ([type_col] if type_col else [])
    folder = src if src.is_dir() else src.parent
    for index, row in enumerate(table_rows(table_shards(src)[split], columns)):
        question, answer = text(row[question_col]), text(row[answer_col])
        if not question:
            yield Dropped("empty question")
            continue
        if not answer:
            yield Dropped("empty answer")
            continue
        qtype = _TYPES.get(text(row[type_col]).lower()) if type_col else yes_no_type(answer)
        if qtype is None:
            yield Dropped(f"{type_col} not closed / open / choice")
            continue
        image = _image(row[image_col], folder, media)
        if isinstance(image, Dropped):
            yield image
            continue
        yield vqa_record(f"{prefix}-{split}-{index}", question, answer, qtype, images=[image])


def _image(cell, folder: Path, media: Media):
    """The record path of an image cell: written-out bytes, or a path under SRC."""
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data:
            return media.image_bytes(data, path or "")
        cell = path
    if isinstance(cell, (bytes, bytearray)) and cell:
        return media.image_bytes(bytes(cell))
    if isinstance(cell, str) and cell.strip():
        rel = cell.strip()
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not (folder / rel).is_file():
            return Dropped("image missing")
        return f"{media.link('source', folder)}/{rel}"
    return Dropped("image missing")
