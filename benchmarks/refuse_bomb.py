"""Peak memory while medmvl refuses a decompression bomb: a ~2 MB .nii.gz declaring 1024³ int16.

Builds (in a temporary folder) a genuine bomb: a NIfTI-1 header declaring 1024 x 1024 x 1024 int16
voxels followed by the whole 2 GiB body of zeros, streamed through gzip (decoded, it would take
2 GiB as int16 and 4 GiB as the float32 the reader returns). Then, each in a fresh process that
reports its own peak RSS (``ru_maxrss``):

- ``medmvl data validate`` on a one-record file naming the bomb, against the same command on a
  file naming a small genuine CT-like volume (the baseline);
- ``read_volume(bomb)`` after importing the reader, against the peak RSS just before the call.

Prints one JSON object; nothing is asserted.

    python benchmarks/refuse_bomb.py [--side 1024]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 64 * 2**20

CLI = """
import json, resource, sys, time
from medmvl_cli.cli.app import main
start, code = time.perf_counter(), 0
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "exit_code": code,
                  "seconds": time.perf_counter() - start}), file=sys.stderr)
"""

READER = """
import json, resource, sys, time
from medmvl_cli.data.limits import TooLargeError
from medmvl_cli.data.volume_io import read_volume
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    read_volume(sys.argv[1])
    outcome = "decoded"
except TooLargeError as err:
    outcome = err.kind
print(json.dumps({"peak_rss_before_kb": before, "peak_rss_after_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "outcome": outcome, "seconds": time.perf_counter() - start}))
"""


def write_bomb(path: Path, side: int) -> Path:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((side, side, side))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    body = side**3 * 2
    zeros = bytes(min(CHUNK, body))
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(header.binaryblock + b"\0" * 4)
        for start in range(0, body, CHUNK):
            fh.write(zeros[: min(CHUNK, body - start)])
    return path


def write_annotations(path: Path, volume: str) -> Path:
    record = {"id": "ct", "image3d": [volume],
              "conversations": [{"from": "human", "value": "<image3d>\nFindings?"}, {"from": "gpt", "value": "None."}]}
    path.write_text(json.dumps(record) + "\n")
    return path


def run_cli(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True)
    figures = json.loads(done.stderr.strip().splitlines()[-1])
    if "--json" in args and done.stdout.strip():
        report = json.loads(done.stdout)
        figures["problem_kinds"] = sorted(report["totals"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1024, help="The bomb declares side³ int16 voxels.")
    args = parser.parse_args()
    import nibabel as nib

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        bomb = write_bomb(folder / "bomb.nii.gz", args.side)
        build_seconds = time.perf_counter() - started
        ct = np.random.default_rng(0).integers(-1024, 1500, (64, 128, 128), dtype=np.int16)
        nib.save(nib.Nifti1Image(ct, np.eye(4)), folder / "ct.nii.gz")
        bomb_run = run_cli(["data", "validate", str(write_annotations(folder / "bomb.jsonl", "bomb.nii.gz")), "--json"])
        clean_run = run_cli(["data", "validate", str(write_annotations(folder / "clean.jsonl", "ct.nii.gz")), "--json"])
        reader = json.loads(subprocess.run([sys.executable, "-c", READER, str(bomb)], capture_output=True,
                                           text=True, check=True).stdout)
        print(json.dumps({
            "bomb": {"declared_shape": [args.side] * 3, "file_mb": round(bomb.stat().st_size / 2**20, 2),
                     "decoded_int16_gb": round(args.side**3 * 2 / 2**30, 2),
                     "decoded_float32_gb": round(args.side**3 * 4 / 2**30, 2), "build_seconds": round(build_seconds, 1)},
            "data_validate": {
                "bomb_peak_rss_mb": round(bomb_run["peak_rss_kb"] / 1024, 1),
                "baseline_peak_rss_mb": round(clean_run["peak_rss_kb"] / 1024, 1),
                "delta_mb": round((bomb_run["peak_rss_kb"] - clean_run["peak_rss_kb"]) / 1024, 1),
                "bomb_exit_code": bomb_run["exit_code"], "bomb_problem_kinds": bomb_run.get("problem_kinds"),
                "bomb_seconds": round(bomb_run["seconds"], 2), "baseline_seconds": round(clean_run["seconds"], 2),
            },
            "read_volume": {
                "outcome": reader["outcome"],
                "peak_rss_before_mb": round(reader["peak_rss_before_kb"] / 1024, 1),
                "peak_rss_after_mb": round(reader["peak_rss_after_kb"] / 1024, 1),
                "delta_mb": round((reader["peak_rss_after_kb"] - reader["peak_rss_before_kb"]) / 1024, 1),
                "seconds": round(reader["seconds"], 4),
            },
        }, indent=2))


if __name__ == "__main__":
    main()
