"""What every converter shares: the record it writes, how a row is dropped, media, atomic files.

A converter reads one split of a published dataset and yields, per source row, either a finished
MedM-VL record (a dict) or a `Dropped` that says why the row was left out. The driver
(`run.py`) counts both, drops duplicates, and streams the records into the split's file.

Media stay where the dataset put them: the output folder gets a symlink to the source's image /
volume folder, so record paths are relative to the output and nothing is copied or modified.
Images stored inside parquet / arrow files are written out once, named by their SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from medmvl_cli.constants import IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER
from medmvl_cli.data.annotations import QUESTION_TYPES
from medmvl_cli.errors import DataError

IMAGE_BYTES_DIR = "images"
CHOICE_LETTERS = "ABCD"


@dataclass(frozen=True)
class Dropped:
    """A source row that gives no record, and why (the reason is what the report counts)."""

    reason: str


@dataclass
class ConvertOptions:
    """What the command line passes to converters (only some converters read each field)."""

    lang: str = "en"
    image_column: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    question_type_column: str | None = None


def vqa_record(
    rid: str,
    question: str,
    answer: str,
    question_type: str,
    *,
    images: Sequence[str] = (),
    volumes: Sequence[str] = (),
    **extra,
) -> dict:
    """One MedM-VL record: placeholders first, then the question; the answer as the gpt turn."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"question_type {question_type!r} is not one of {QUESTION_TYPES}")
    placeholders = f"{IMAGE_PLACEHOLDER}\n" * len(images) + f"{VOLUME_PLACEHOLDER}\n" * len(volumes)
    record: dict = {"id": rid}
    if images:
        record["image"] = list(images)
    if volumes:
        record["image3d"] = list(volumes)
    record["conversations"] = [
        {"from": "human", "value": placeholders + question},
        {"from": "gpt", "value": answer},
    ]
    record["answer"] = answer
    record["question_type"] = question_type
    record.update(extra)
    return record


def yes_no_type(answer: str) -> str:
    """closed for a yes / no answer, else open: the rule of the PathVQA and VQA-RAD parquet cards."""
    from medmvl_cli.data.answer_text import is_yes_no

    return "closed" if is_yes_no(answer) else "open"


def choice_question(question: str, choices: Sequence[str]) -> str:
    """M3D-Bench's closed-question form: "Q Choices: A. x B. y C. z D. w"."""
    listed = " ".join(f"{letter}. {text}" for letter, text in zip(CHOICE_LETTERS, choices))
    return f"{question} Choices: {listed}"


def text(value) -> str:
    """A cell (string, number or None) as stripped text; None becomes ""."""
    if value is None:
        return ""
    return str(value).strip()


# ------------------------------------------------------------------------------------------ media
class Media:
    """Paths to media as records write them: relative to the output folder."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def link(self, name: str, target: Path) -> str:
        """Make `out_dir/name` a symlink to the source folder `target`; return `name`.

        Re-running with the same target is a no-op; a different target is an error (the records
        already written point through the old one)."""
        link = self.out_dir / name
        target = target.resolve()
        if link.is_symlink():
            if Path(os.readlink(link)).resolve() != target:
                raise DataError(
                    f"{link} already links to {os.readlink(link)}, not {target}",
                    hint="convert into an empty --out folder, or remove that link",
                )
            return name
        if link.exists():
            raise DataError(f"{link} exists and is not a link medmvl made",
                            hint="convert into an empty --out folder")
        link.symlink_to(target, target_is_directory=True)
        return name

    def image_bytes(self, data: bytes, name_hint: str = "") -> str:
        """Write image bytes once, as images/<sha[:2]>/<sha>.<ext>; return the relative path."""
        digest = hashlib.sha256(data).hexdigest()
        ext = _image_suffix(data, name_hint)
        rel = f"{IMAGE_BYTES_DIR}/{digest[:2]}/{digest}{ext}"
        path = self.out_dir / rel
        # No fsync per image (it was most of the run time): a file a crash left short is caught by
        # its size and written again on the re-run.
        if not path.is_file() or path.stat().st_size != len(data):
            with atomic_file(path, "wb", durable=False) as fh:
                fh.write(data)
        return rel


_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def _image_suffix(data: bytes, name_hint: str) -> str:
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if len(data) > 132 and data[128:132] == b"DICM":
        return ".dcm"
    suffix = Path(name_hint).suffix.lower()
    return suffix if suffix else ".img"


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", durable: bool = True) -> Iterator[IO]:
    """A temp file beside `path`, moved into place only when the block ends without error
    (after an fsync when `durable`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def find_one(src: Path, patterns: Sequence[str], what: str, hint: str) -> Path:
    """The first file under `src` matching one of the glob patterns, else DataError."""
    for pattern in patterns:
        found = sorted(src.glob(pattern))
        if found:
            return found[0]
    raise DataError(f"{src}: no {what} (looked for {', '.join(patterns)})", hint=hint)


def load_json(path: Path, kind: type) -> list | dict:
    """A published JSON file read whole (each is a few MB at most), checked to be a list / dict."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})", hint="re-download the file") from None
    if not isinstance(data, kind):
        raise DataError(f"{path}: expected a JSON {'list' if kind is list else 'object'} at the top",
                        hint="give the dataset's own file, unchanged")
    return data
