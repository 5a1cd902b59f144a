"""Multi-question CT inference: this tree against an earlier medmvl commit, same model, same file.

`infer_throughput.py`'s `baseline` switches today's features off inside today's code; this script
runs the earlier code itself. The commit (default 1f72c4a, the medmvl issue 16 measured: no prefix
reuse, no read-ahead) is checked out with `git worktree` into a temporary folder and installed in
a virtual environment of its own there (`pip install -c constraints.txt -e .`: a few minutes, the
package index reachable), or taken from `--old-python`, a Python that already has it installed.
The earlier code builds and saves the model (a random-init Qwen2 of hidden 384, 6 layers, a MONAI
3D ViT, spatial pooling to 256 tokens a volume, as in `infer_throughput.py`), since today's code
reads folders saved before its processor while the earlier one does not read today's; this tree
writes the CT-RATE-shaped file (16 synthetic CT volumes x 4 questions). Each (version, batch
size) run is its own process: `Predictor` + `predict_file` with each version's defaults, greedy
answers of exactly 32 tokens (min_new_tokens), timed from the first question to the last row
written. Rounds alternate the versions; the fastest round of each is kept. Reports items/s per
version and batch size, the speed-up and whether both wrote byte-identical prediction files.
The worktree and the environment are removed at the end.

    python benchmarks/infer_vs_commit.py [--commit 1f72c4a] [--old-python PATH] [--batch-sizes 1,8,32]
                                         [--rounds 1] [--files 16] [--questions-per-file 4] [--new-tokens 32]

Prints one JSON object on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

logger = logging.getLogger("benchmarks.infer_vs_commit")

ISSUE_16_COMMIT = "1f72c4a"


# --------------------------------------------------------------------------- roles (subprocesses)
# These run under either version's Python and use only what both versions have.


def build_model(folder: Path) -> Path:
    """The small 3D model, built and saved by whichever medmvl this Python imports."""
    import yaml
    from infer_throughput import VOLUME_POOL
    from train_throughput import SIZES, VOLUME_PATCH, VOLUME_SIZE, write_llm

    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.model import builder

    sizes = SIZES["full"]
    tree = {"stage": "finetune", "output_dir": str(folder / "run"),
            "model": {"llm": {"path": str(write_llm(folder / "llm", sizes["llm"])), "max_length": 512,
                              "dtype": "float32"},
                      "image3d": {"encoder": {"type": "vit3d", "patch_size": list(VOLUME_PATCH), **sizes["vit3d"]},
                                  "connector": {"type": "spatial_pooling", "pool": list(VOLUME_POOL), "depth": 2},
                                  "volume": {"size": list(VOLUME_SIZE), "crop_foreground": False}}}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    recipe = load_recipe(folder / "recipe.yaml", stage="finetune")
    if "tokenizer" in inspect.signature(builder.save_model).parameters:  # before the processor
        model, tokenizer, image_processor = builder.build_model(recipe, dtype="float32")
        return builder.save_model(model, folder / "run" / "model", tokenizer=tokenizer, image_processor=image_processor)
    from medmvl_cli.inference.load import build

    model, processor = build(recipe, dtype="float32")
    return builder.save_model(model, folder / "run" / "model", processor)


def answer_file(model_dir: Path, annotations: Path, out: Path, batch_size: int, new_tokens: int) -> dict:
    """Seconds for `predict_file` to answer `annotations` into `out`, after a warm-up question."""
    from infer_throughput import settings_class

    from medmvl_cli.data.annotations import AnnotationFile, default_root, parse_record
    from medmvl_cli.inference.generate import Predictor
    from medmvl_cli.inference.predictions import predict_file, to_question

    FixedLength = settings_class()
    predictor = Predictor(model_dir)
    root = default_root(annotations, None)
    first = to_question(parse_record(next(iter(AnnotationFile(annotations)))), root, root)
    predictor.generate([first.request], FixedLength(max_new_tokens=1), use_feature_cache=False)
    start = time.perf_counter()
    counts = predict_file(predictor, annotations, out, FixedLength(max_new_tokens=new_tokens),
                          batch_size=batch_size, overwrite=True)
    return {"items": counts["asked"], "errors": counts["errors"], "seconds": time.perf_counter() - start}


def role(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["model", "answer"], required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--annotations", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--new-tokens", type=int)
    args = parser.parse_args(argv)
    if args.role == "model":
        result = {"model_dir": str(build_model(args.folder))}
    else:
        result = answer_file(args.folder / "run" / "model", args.annotations, args.out, args.batch_size,
                             args.new_tokens)
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------- orchestration


def run_role(python: str, *args: str) -> dict:
    """One role in its own process: the JSON after its `RESULT ` line."""
    done = subprocess.run([python, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{python} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def old_environment(commit: str, folder: Path, old_python: str | None) -> str:
    """A Python with `commit` installed: `old_python`, else one installed from a worktree of it."""
    if old_python:
        return old_python
    source = folder / "source"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(source), commit],
                   check=True, capture_output=True)
    logger.info("installing medmvl at %s into a temporary environment (a few minutes)", commit)
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "-c", str(source / "constraints.txt"), "-e", str(source)],
                   check=True)
    return python


def main(argv: list[str] | None = None, out_stream=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--role" in argv:
        role(argv)
        return {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", default=ISSUE_16_COMMIT, help="the earlier medmvl (default: issue 16's)")
    parser.add_argument("--old-python", help="a Python that already has that commit installed (skips the install)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=1, help="rounds alternating the versions; fastest kept")
    parser.add_argument("--files", type=int, default=16, help="CT volumes in the file")
    parser.add_argument("--questions-per-file", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    from infer_throughput import make_files

    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{args.commit}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0 and not args.old_python:
        raise SystemExit(f"commit {args.commit} is not in {REPO} (a shallow clone?): `git fetch --unshallow`, "
                         "or pass --old-python with that commit installed")
    commit = found.stdout.strip() or args.commit
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    started, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medmvl-vs-commit-") as tmp:
        folder = Path(tmp)
        try:
            old_python = old_environment(commit, folder, args.old_python)
            pythons = {"earlier": old_python, "this_tree": sys.executable}
            annotations = make_files(folder, "3d", args.files, args.questions_per_file, (64, 256, 256))
            run_role(old_python, "--role", "model", "--folder", str(folder))
            best: dict[tuple, dict] = {}
            for round_ in range(args.rounds):
                for batch_size in batch_sizes:
                    for version, python in pythons.items():
                        out = folder / f"{version}-{batch_size}.jsonl"
                        run = run_role(python, "--role", "answer", "--folder", str(folder), "--annotations",
                                       str(annotations), "--out", str(out), "--batch-size", str(batch_size),
                                       "--new-tokens", str(args.new_tokens))
                        run["items_per_s"] = run["items"] / run["seconds"]
                        logger.info("round %d, %s, batch %d: %.3f items/s", round_ + 1, version, batch_size,
                                    run["items_per_s"])
                        if (version, batch_size) not in best or run["items_per_s"] > best[version, batch_size]["items_per_s"]:
                            best[version, batch_size] = {**run, "_rows": out.read_bytes()}
        finally:
            if (folder / "source").exists():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder / "source")],
                               capture_output=True)
    results = {}
    for batch_size in batch_sizes:
        earlier, now = best["earlier", batch_size], best["this_tree", batch_size]
        results[f"batch_{batch_size}"] = {
            "earlier_items_per_s": round(earlier["items_per_s"], 3), "this_tree_items_per_s": round(now["items_per_s"], 3),
            "speedup": round(now["items_per_s"] / earlier["items_per_s"], 2),
            "same_rows": earlier["_rows"] == now["_rows"], "errors": earlier["errors"] + now["errors"],
        }
    out = {
        "benchmark": "infer_vs_commit", "earlier_commit": commit, "this_tree_head": head,
        "files": args.files, "questions_per_file": args.questions_per_file, "new_tokens_per_answer": args.new_tokens,
        "rounds_fastest_kept": args.rounds, "cpus": os.cpu_count(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "total_s": round(time.perf_counter() - started, 1),
        "runs": results,
    }
    print(json.dumps(out, indent=2), file=out_stream or sys.stdout, flush=True)
    return out


if __name__ == "__main__":
    from train_throughput import results_stream

    main(out_stream=None if "--role" in sys.argv else results_stream())
