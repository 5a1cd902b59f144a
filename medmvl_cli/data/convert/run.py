"""The `medmvl data convert` driver: one annotation file per split, counted, deduplicated, validated.

Each split is streamed into `OUT/<split>.json` (a JSON list, MedM-VL's own format) through a
temp file that replaces the old one only when the split is complete, so a re-run after a crash
or on a finished folder leaves the same bytes. `OUT/conversion.json` holds the counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medmvl_cli.data.convert.base import ConvertOptions, Dropped, Media, atomic_file
from medmvl_cli.errors import DataError

log = logging.getLogger(__name__)

Row = dict | list | Dropped


@dataclass(frozen=True)
class Converter:
    """One dataset: which splits a source holds, and the rows of one split."""

    name: str
    summary: str
    splits: Callable[[Path, ConvertOptions], list[str]]
    rows: Callable[[Path, str, Media, ConvertOptions], Iterator[Row]]


@dataclass
class SplitReport:
    split: str
    file: Path
    read: int = 0
    written: int = 0
    dropped: Counter = field(default_factory=Counter)
    validation: dict | None = None  # {"ok": bool, "problems": {kind: count}}

    def to_dict(self) -> dict:
        return {"file": self.file.name, "read": self.read, "written": self.written,
                "dropped": dict(sorted(self.dropped.items())), "validation": self.validation}


@dataclass
class ConvertReport:
    dataset: str
    source: Path
    out_dir: Path
    splits: list[SplitReport]

    @property
    def ok(self) -> bool:
        return all(s.validation is None or s.validation["ok"] for s in self.splits)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "source": str(self.source), "out_dir": str(self.out_dir),
                "splits": {s.split: s.to_dict() for s in self.splits}}


def convert(
    converter: Converter,
    src: Path,
    out_dir: Path,
    splits: list[str] | None = None,
    options: ConvertOptions | None = None,
    validate: bool = True,
) -> ConvertReport:
    """Convert the `splits` of `src` (default: every split it holds) into `out_dir`."""
    options = options or ConvertOptions()
    src, out_dir = Path(src), Path(out_dir)
    _check_folders(src, out_dir)
    available = converter.splits(src, options)
    chosen = list(splits) if splits else available
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise DataError(f"{src}: no split {', '.join(unknown)} for {converter.name} (found: {', '.join(available) or 'none'})",
                        hint=f"pick --split from {', '.join(available)}" if available else "check SRC is the dataset's folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    media = Media(out_dir)
    report = ConvertReport(converter.name, src, out_dir, [])
    for split in chosen:
        split_report = SplitReport(split, out_dir / f"{split}.json")
        _write_split(converter.rows(src, split, media, options), split_report)
        log.debug("%s %s: %d read, %d written, %d dropped", converter.name, split,
                 split_report.read, split_report.written, sum(split_report.dropped.values()))
        if validate:
            split_report.validation = _validate(split_report.file, out_dir)
        report.splits.append(split_report)
    _write_summary(out_dir / "conversion.json", report.to_dict())
    return report


def _write_summary(path: Path, summary: dict) -> None:
    """conversion.json; splits converted by an earlier run of the same dataset into DIR are kept."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = {}
    if isinstance(earlier, dict) and earlier.get("dataset") == summary["dataset"] and isinstance(earlier.get("splits"), dict):
        summary["splits"] = {**earlier["splits"], **summary["splits"]}
    with atomic_file(path) as fh:
        json.dump(summary, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def _check_folders(src: Path, out_dir: Path) -> None:
    if not src.exists():
        raise DataError(f"{src} does not exist", hint="give the folder (or file) the dataset was downloaded to")
    src_real, out_real = src.resolve(), out_dir.resolve()
    if out_real == src_real or src_real in out_real.parents:
        raise DataError(f"--out {out_dir} is inside the source {src}",
                        hint="write the converted files to a folder outside the dataset: the source is never modified")


def _write_split(rows: Iterable[Row], report: SplitReport) -> None:
    seen_ids: set[str] = set()
    seen_content: set[bytes] = set()
    with atomic_file(report.file) as fh:
        fh.write("[")
        for row in rows:
            report.read += 1
            if isinstance(row, Dropped):
                report.dropped[row.reason] += 1
                continue
            for record in row if isinstance(row, list) else [row]:
                reason = _duplicate(record, seen_ids, seen_content)
                if reason is not None:
                    report.dropped[reason] += 1
                    continue
                fh.write(("\n" if report.written == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
                report.written += 1
        fh.write("\n]\n")


def _duplicate(record: dict, seen_ids: set[str], seen_content: set[bytes]) -> str | None:
    """A record asking the same question of the same media with the same answer is dropped once
    seen; so is a reused id."""
    content = json.dumps([record.get("image"), record.get("image3d"), record["conversations"]], ensure_ascii=False)
    digest = hashlib.blake2b(content.encode("utf-8"), digest_size=16).digest()
    if digest in seen_content:
        return "duplicate question (same media, question and answer)"
    if record["id"] in seen_ids:
        return "duplicate id"
    seen_content.add(digest)
    seen_ids.add(record["id"])
    return None


def _validate(path: Path, out_dir: Path) -> dict:
    from medmvl_cli.data.validate import validate_annotations

    # Not --strict-paths: record paths are relative by construction, but they reach the media
    # through the output's links to the source folders, which strict paths flag as leaving the root.
    result = validate_annotations(path, out_dir, out_dir, strict_paths=False, mode="train")
    return {"ok": result.ok, "problems": dict(result.totals)}
