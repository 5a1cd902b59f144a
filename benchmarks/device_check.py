"""The GPU path in one short run: what a session with a lent GPU runs, once, to prove it.

1. Training steps through the real CLI (`medmvl finetune` on `recipes/quickstart/tiny-2d.yaml` and
   the synthetic 2D data) with `model.llm.dtype: auto` for each attention kernel available: sdpa, and
   flash_attention_2 where the flash-attn package and a GPU are there; each packed (the recipe's
   default: the packed attention path the run chose is reported, flash-attn's varlen kernel on a
   GPU with flash-attn) and padded, with the largest loss gap between the two. Reports the compute
   dtype the saved weights carry (bf16 on GPUs that support it, fp32 on CPUs), the losses and tokens/s.
2. The same run under DeepSpeed ZeRO-2 on one process (`--nproc-per-node 1`), and how far its losses
   are from the plain run's.
3. Generation speed: `benchmarks/infer_throughput.py --quick` (fixed-length greedy answers to
   multi-question 3D and 2D files at batch 1 / 8 / 32, with and without prefix reuse and the
   baseline; read-ahead of volumes, which a GPU always has a core for; the decode step), whose JSON
   is embedded as is.

On a CPU the same steps run in fp32, so the script itself is checked on any machine. It asserts
nothing: one JSON object on stdout (a failed step reports its stderr tail there).

    python benchmarks/device_check.py [--steps 30] [--skip-deepspeed] [--skip-generation]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart" / "tiny-2d.yaml"


def environment() -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "deepspeed_installed": importlib.util.find_spec("deepspeed") is not None,
    }


def saved_dtypes(model_dir: Path) -> list[str]:
    """The dtypes of the floating-point tensors in the run's model.safetensors (from its header)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()} - {"I64", "I32", "BOOL"})


def train(data: Path, out: Path, steps: int, overrides: list[str], launch: list[str]) -> dict:
    command = [
        sys.executable, "-m", "medmvl_cli", "finetune", str(RECIPE), *launch,
        f"output_dir={out}", f"data.train.0.annotations={data / 'train_2d.json'}", f"data.train.0.image_root={data}",
        f"data.eval.0.annotations={data / 'test_2d.json'}", f"data.eval.0.image_root={data}",
        "model.llm.dtype=auto", f"train.max_steps={steps}", "train.logging_steps=1", "train.save_steps=100000",
        *overrides,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"ok": False, "wall_s": round(wall, 1), "error": result.stderr[-2000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_logged = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    path = re.search(r"packed attention path: (\S+)", result.stderr)
    return {
        "ok": True, "wall_s": round(wall, 1), "packed_attention_path": path.group(1) if path else None,
        "losses": [round(r["loss"], 5) for r in steps_logged],
        "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in steps_logged[1:] or steps_logged), 1),
        "saved_dtypes": saved_dtypes(out / "model"),
    }


def max_loss_gap(a: dict, b: dict) -> float | None:
    if not (a.get("ok") and b.get("ok")):
        return None
    return round(max(abs(x - y) for x, y in zip(a["losses"], b["losses"])), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training run")
    parser.add_argument("--skip-deepspeed", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()

    from medmvl_cli.data.synth import synthesize

    report: dict = {"benchmark": "device_check", "environment": environment(), "steps": args.steps}
    env = report["environment"]
    with tempfile.TemporaryDirectory(prefix="medmvl-device-") as tmp:
        work = Path(tmp)
        data = work / "data"
        synthesize(data, kind="2d", n=200, seed=0, questions="easy")
        kernels = ["sdpa"] + (["flash_attention_2"] if env["cuda"] and env["flash_attn_installed"] else [])
        # The recipe packs its batches (flash-attn's varlen kernel on a GPU with flash_attention_2 or
        # with flash-attn installed, `packed_sdpa` otherwise); "_padded" is the same run padded.
        report["training"] = {}
        for kernel in kernels:
            for name, packing in ((kernel, "true"), (f"{kernel}_padded", "false")):
                report["training"][name] = train(data, work / f"run-{name}", args.steps,
                                                 [f"model.llm.attn_implementation={kernel}", f"data.packing={packing}"], [])
            report["training"][kernel]["max_loss_gap_to_padded"] = max_loss_gap(
                report["training"][kernel], report["training"][f"{kernel}_padded"])
        if not args.skip_deepspeed and env["deepspeed_installed"]:
            zero2 = train(data, work / "run-zero2", args.steps, ["distributed.deepspeed=zero2"], ["--nproc-per-node", "1"])
            zero2["max_loss_gap_to_sdpa"] = max_loss_gap(zero2, report["training"]["sdpa"])
            report["deepspeed_zero2"] = zero2
        if not args.skip_generation:
            result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "infer_throughput.py"), "--quick"],
                                    capture_output=True, text=True, cwd=ROOT)
            report["generation"] = (json.loads(result.stdout) if result.returncode == 0
                                    else {"ok": False, "error": result.stderr[-2000:]})
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
