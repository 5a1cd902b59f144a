"""`medmvl quickstart` on an idle machine and on one shared with busy jobs, medmvl's thread policy
against the old behaviour (every core, spinning OpenMP waits), printed as JSON.

The other jobs are N processes that spin on the CPU (`--jobs`, default 3x the CPUs). Each quickstart
runs in its own Python (the thread policy is chosen at start), on one synthetic dataset written
beforehand, so the figures are training + answering only. Per run: wall seconds, the CPU seconds
the quickstart used and its held-out accuracy. A run that passes `--timeout` is stopped and
reported as such.

    python benchmarks/shared_machine.py [--kind 2d] [--jobs 6] [--warmup 60] [--timeout 600]

"old" is `MEDMVL_THREADS=<CPUs> OMP_WAIT_POLICY=ACTIVE` (what torch does by itself); "medmvl" is
the default policy of `medmvl_cli/threads.py` (CPUs available less the load, passive waits when
shared).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {"old": {"MEDMVL_THREADS": str(os.cpu_count()), "OMP_WAIT_POLICY": "ACTIVE"}, "medmvl": {}}


def spin() -> None:
    while True:
        pass


def chosen_threads(env: dict) -> str | None:
    """What the thread policy chooses now, as `medmvl env` says it (a wide table: one line)."""
    out = subprocess.run([sys.executable, "-m", "medmvl_cli", "env"], env={**env, "COLUMNS": "300"},
                         capture_output=True, text=True).stdout
    found = re.search(r"cpu threads\W+(\d+ \(.*\))", out)
    return found.group(1) if found else None


def quickstart(workdir: Path, kind: str, policy: str, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MEDMVL_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(POLICIES[policy])
    # Asked just before the run, at the load the quickstart starts under (it chooses once, at start).
    row = {"policy": policy, "threads": chosen_threads(env), "load_at_start": round(os.getloadavg()[0], 1)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "medmvl_cli", "quickstart", "--kind", kind, "--workdir", str(workdir), "-q"],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "wall_s": None, "stopped_after_s": timeout}
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = re.search(r"held-out accuracy\D*([0-9.]+)", done.stdout)
    return {**row, "wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "accuracy": float(found.group(1)) if found else None, "rc": done.returncode}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("2d", "3d"), default="2d")
    parser.add_argument("--jobs", type=int, default=3 * (os.cpu_count() or 1), help="busy processes sharing the machine")
    parser.add_argument("--warmup", type=float, default=60, help="seconds the jobs run before the first loaded quickstart")
    parser.add_argument("--timeout", type=float, default=600, help="stop a quickstart after this many seconds")
    args = parser.parse_args(argv)

    from medmvl_cli.data.synth import synthesize
    from medmvl_cli.workflows.quickstart import CASES

    workdir = Path(tempfile.mkdtemp(prefix="medmvl-shared-"))
    synthesize(workdir / "data" / "quickstart", kind=args.kind, n=CASES[args.kind], seed=0, questions="easy")
    runs = [dict(quickstart(workdir, args.kind, policy, args.timeout), machine="idle") for policy in ("medmvl", "old")]
    jobs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.jobs)]
    for job in jobs:
        job.start()
    try:
        time.sleep(args.warmup)
        runs += [dict(quickstart(workdir, args.kind, policy, args.timeout), machine=f"{args.jobs} busy jobs")
                 for policy in ("medmvl", "old")]
    finally:
        for job in jobs:
            job.terminate()
            job.join()
    print(json.dumps({"kind": args.kind, "cpus": os.cpu_count(), "jobs": args.jobs, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
