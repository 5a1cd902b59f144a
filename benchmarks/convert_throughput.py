"""Rows/s and peak memory of `medmvl data convert hf` on a large generated parquet dataset.

Writes N rows (tiny PNGs stored as `datasets.Image` bytes, 1 in 4 images shared, short
question / answer text) in shards of 10k rows, converts them with validation off and on, and
prints one JSON object: rows/s, images written, and the peak RSS of each conversion (measured in a
child process, so the generation does not count). Flat peak RSS as N grows = streaming.

    python benchmarks/convert_throughput.py [--rows 100000] [--validate]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path


def _write_source(folder: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(max(rows // 4, 1)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (folder / "data").mkdir(parents=True)
    shard = 10_000
    total = (rows + shard - 1) // shard
    for n, start in enumerate(range(0, rows, shard)):
        ids = range(start, min(start + shard, rows))
        table = pa.table({
            "image": pa.array([{"bytes": images[i % len(images)], "path": f"{i}.png"} for i in ids], type=image_type),
            "question": [f"Is there a lesion in image {i}?" for i in ids],
            "answer": ["yes" if i % 2 else "no, the study is normal" for i in ids],
        })
        pq.write_table(table, folder / "data" / f"train-{n:05d}-of-{total:05d}.parquet")


def _convert(src: str, out: str, validate: bool, queue) -> None:
    from medmvl_cli.data.convert import convert, get_converter

    start = time.perf_counter()
    report = convert(get_converter("hf"), Path(src), Path(out), validate=validate)
    seconds = time.perf_counter() - start
    split = report.splits[0]
    queue.put({"seconds": round(seconds, 2), "rows_per_s": round(split.read / seconds, 1), "written": split.written,
               "images": sum(1 for _ in (Path(out) / "images").rglob("*.png")),
               "validation_ok": None if split.validation is None else split.validation["ok"],
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--validate", action="store_true", help="also time a run with `data validate` on the output")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        _write_source(src, args.rows)
        result = {"rows": args.rows}
        for validate in ([False, True] if args.validate else [False]):
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=_convert, args=(str(src), str(Path(tmp) / f"out-{validate}"), validate, queue))
            proc.start()
            result["with_validation" if validate else "convert_only"] = queue.get()
            proc.join()
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
