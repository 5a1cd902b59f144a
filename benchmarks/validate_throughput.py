"""Records per second of `medmvl data validate` on a large, mostly-text JSONL.

Builds (in a temporary folder) a JSONL of --records records, of which --images name one small
PNG each (every PNG used once), the rest being text-only multi-turn conversations; then times
reading alone and the full validation (records + files). Prints one JSON object.

    python benchmarks/validate_throughput.py --records 100000 --images 3000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def build(folder: Path, records: int, images: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    vocab = np.array("the chest film shows a small nodule in the right upper lobe with no effusion".split())
    (folder / "img").mkdir()
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / "img" / f"{i:06d}.png")
    path = folder / "train.jsonl"
    image_every = max(1, records // max(images, 1))
    with open(path, "w") as fh:
        used = 0
        for i in range(records):
            text = lambda n: " ".join(vocab[rng.integers(0, len(vocab), n)])  # noqa: E731
            record = {"id": f"r{i:07d}", "conversations": [
                {"from": "human", "value": text(12) + "?"}, {"from": "gpt", "value": text(30) + "."},
                {"from": "human", "value": text(8) + "?"}, {"from": "gpt", "value": text(20) + "."},
            ]}
            if used < images and i % image_every == 0:
                record["image"] = [f"img/{used:06d}.png"]
                record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]
                used += 1
            fh.write(json.dumps(record) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=3_000)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    from medmvl_cli.data.annotations import AnnotationFile, schema_problems
    from medmvl_cli.data.validate import validate_annotations

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        path = build(folder, args.records, args.images)
        build_s = time.perf_counter() - t0
        file_mb = round(os.path.getsize(path) / 1e6, 1)

        t0 = time.perf_counter()
        parsed = sum(schema_problems(raw)[0] is not None for raw in AnnotationFile(path))
        read_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        text_only = validate_annotations(path, check_files=False)
        records_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        report = validate_annotations(path, workers=args.workers)
        full_s = time.perf_counter() - t0

    print(json.dumps({
        "records": report.records,
        "images": report.files_checked,
        "file_mb": file_mb,
        "problems": report.totals,
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "build_s": round(build_s, 2),
        "read_and_parse_records_per_s": round(parsed / read_s),
        "validate_records_only_records_per_s": round(text_only.records / records_s),
        "validate_full_s": round(full_s, 2),
        "validate_full_records_per_s": round(report.records / full_s),
    }, indent=2))


if __name__ == "__main__":
    main()
