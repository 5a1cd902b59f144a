"""Streaming readers for the published table formats: CSV, parquet shards, HF `datasets` folders.

Rows come one at a time (parquet in record batches, arrow IPC streams batch by batch, CSV through
`csv.DictReader`), so a 100k-row source never sits in memory at once.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from medmvl_cli.errors import DataError

BATCH_ROWS = 256
# The hub's shard names: data/train-00000-of-00002-<hash>.parquet, default/train/0000.parquet,
# and a `datasets` save_to_disk folder: train/data-00000-of-00001.arrow.
_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}-of-\d{5}")
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "validate", "dev"), "test": ("test",)}


def csv_rows(path: Path, required: Sequence[str]) -> Iterator[dict]:
    """Rows of a CSV as dicts; DataError naming the file if a required column is missing."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(columns) or 'no header'})",
                hint="pass the file as the dataset publishes it (its header row unchanged)",
            )
        yield from reader


def split_of(path: Path, src: Path) -> str:
    """The split a parquet / arrow shard belongs to: from its name (`test-00000-of-00001`), else its
    folder's (`default/test/0000.parquet`, save_to_disk's `test/data-00000-of-00001.arrow`), else
    `train` for a file directly in SRC (one parquet file, a single-split save_to_disk)."""
    match = _SHARD.match(path.name)
    if match and match.group("split") != "data":
        return canonical_split(match.group("split"))
    if path.parent != src and not src.is_file():
        return canonical_split(path.parent.name)
    return "train"


def canonical_split(name: str) -> str:
    """train / validation / test for their usual spellings (val, valid, dev, ...), else the name."""
    for split, aliases in SPLIT_ALIASES.items():
        if name.lower() in aliases:
            return split
    return name


def table_shards(src: Path) -> dict[str, list[Path]]:
    """Parquet / arrow files under `src` grouped by split, train / validation / test first."""
    files = [src] if src.is_file() else sorted(src.rglob("*.parquet")) + sorted(src.rglob("*.arrow"))
    shards: dict[str, list[Path]] = {}
    for path in files:
        shards.setdefault(split_of(path, src), []).append(path)
    order = [s for s in SPLIT_ALIASES if s in shards] + sorted(s for s in shards if s not in SPLIT_ALIASES)
    return {s: shards[s] for s in order}


def table_rows(paths: Sequence[Path], columns: Sequence[str]) -> Iterator[dict]:
    """Rows of parquet / arrow shards, only `columns`, batch by batch."""
    for path in paths:
        names = table_columns(path)
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(
                f"{path}: no column(s) {', '.join(missing)} (has {', '.join(names)})",
                hint="name the columns with --image-column / --question-column / --answer-column",
            )
        for batch in _batches(path, columns):
            yield from batch.to_pylist()


def table_columns(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    return list(_arrow_reader(path).schema.names)


def _batches(path: Path, columns: Sequence[str]):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=list(columns))
        return
    for batch in _arrow_reader(path):
        yield batch.select(list(columns))


def _arrow_reader(path: Path):
    """`datasets.save_to_disk` writes arrow IPC streams, memory-mapped here."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: not an arrow IPC stream ({err})",
                        hint="give the folder `datasets.save_to_disk` wrote, or its parquet export") from None
