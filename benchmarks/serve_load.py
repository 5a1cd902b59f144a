"""`medmvl serve` under load: requests/s and latency at concurrency 1 / 8 / 32, against the same
requests answered one by one, and what the feature cache saves on multi-question volumes.

Two untrained models, built in code and saved as run folders: `tiny` (the preset tiny-qwen2 LLM,
a tiny CLIP and a tiny 3D ViT: 2D and 3D requests mixed) and `small` (infer_throughput.py's 3D
model: a Qwen2 of hidden 384 / 6 layers, --quick 256 / 4, and a 3D ViT on (32, 128, 128)). The
server runs in this process on a loopback port (`serve_in_thread`), the official `openai` async
client sends the requests (images as data: URLs, NIfTI volumes as file parts, 3 questions per
volume, greedy, `max_tokens` = --new-tokens). For each model:

- `one_by_one`: each request answered alone by `Predictor.generate` (no server, no batching, no
  HTTP), in one worker thread as the server's model runs;
- `concurrency_C`: the requests sent with C in flight at once: requests/s, completion tokens/s,
  p50 / p95 / p99 latency, and the batches the server formed;
- `feature_cache` (small model): the questions sent one at a time with the volumes interleaved
  (v0 q0, v1 q0, ..., v0 q1, ...), with the feature cache on (each volume encoded once) and with a
  one-entry cache (every question encodes its volume again).

    python benchmarks/serve_load.py [--quick] [--requests 64] [--concurrency 1,8,32] [--new-tokens 16]
                                    [--models tiny,small] [--max-batch-size 16]

Loopback only, bounded loops. Prints one JSON object on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_throughput import build_saved_model  # noqa: E402  (sibling benchmark: the same small 3D model)
from train_throughput import SIZES, results_stream  # noqa: E402

logger = logging.getLogger("benchmarks.serve_load")

TINY_RECIPE = """
model:
  llm: {preset: tiny-qwen2, max_length: 512, dtype: float32}
  image:
    encoder: {type: clip, preset: tiny}
    connector: {type: mlp}
  image3d:
    encoder: {type: vit3d, preset: tiny, select_layer: 0}
    connector: {type: spatial_pooling, pool: 2}
    volume: {size: [16, 32, 32], crop_foreground: false}
"""
QUESTIONS = {"2d": ["Which quadrant of the chest holds the lesion?", "Is there a pleural effusion?", "Describe the film."],
             "3d": ["Which lung has the lesion?", "Is there a pleural effusion?", "Write the findings for this CT."]}


def build_tiny(folder: Path) -> Path:
    import torch

    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.inference.load import build
    from medmvl_cli.model.builder import save_model

    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(TINY_RECIPE)
    torch.manual_seed(0)
    model, processor = build(load_recipe(folder / "recipe.yaml", []))
    return save_model(model, folder / "run" / "model", processor)


def requests_for(data: Path, kinds: tuple[str, ...], count: int, interleave: bool = False) -> list[tuple]:
    """`count` (messages, medmvl Request) pairs: 3 questions per input, cycling over the inputs."""
    from medmvl_cli.inference.generate import Request

    inputs = []
    if "2d" in kinds:
        inputs += [("2d", p) for p in sorted((data / "images").glob("*.png"))[:8]]
    if "3d" in kinds:
        inputs += [("3d", p) for p in sorted((data / "volumes").glob("*.nii.gz"))[:8]]
    pairs = [(kind, path, q) for kind, path in inputs for q in QUESTIONS[kind]]
    if interleave:
        pairs = [(kind, path, q) for q_i in range(3) for kind, path in inputs for q in [QUESTIONS[kind][q_i]]]
    out = []
    for kind, path, question in (pairs * (count // len(pairs) + 1))[:count]:
        encoded = base64.b64encode(path.read_bytes()).decode()
        if kind == "2d":
            part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}
            request = Request([{"role": "user", "content": f"<image>\n{question}"}], images=[path])
        else:
            part = {"type": "file", "file": {"file_data": encoded, "filename": path.name}}
            request = Request([{"role": "user", "content": f"<image3d>\n{question}"}], volumes=[path])
        out.append(([{"role": "user", "content": [part, {"type": "text", "text": question}]}], request))
    return out


def percentiles(latencies: list[float]) -> dict:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50_s": round(cuts[49], 4), "p95_s": round(cuts[94], 4), "p99_s": round(cuts[98], 4)}


def one_by_one(predictor, pairs, new_tokens: int) -> dict:
    from medmvl_cli.inference.generate import GenerationSettings

    settings = GenerationSettings(max_new_tokens=new_tokens)
    predictor.clear_feature_cache()
    latencies = []
    start = time.perf_counter()
    for _, request in pairs:
        began = time.perf_counter()
        predictor.generate([request], settings)
        latencies.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    return {"requests_per_s": round(len(pairs) / elapsed, 2), **percentiles(latencies)}


async def load(url: str, model: str, pairs, concurrency: int, new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    latencies, tokens = [], []

    async def one(messages):
        async with gate:
            began = time.perf_counter()
            reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=new_tokens,
                                                         temperature=0)
            latencies.append(time.perf_counter() - began)
            tokens.append(reply.usage.completion_tokens)

    start = time.perf_counter()
    await asyncio.gather(*[one(messages) for messages, _ in pairs])
    elapsed = time.perf_counter() - start
    await client.close()
    return {"requests_per_s": round(len(pairs) / elapsed, 2), "completion_tokens_per_s": round(sum(tokens) / elapsed, 1),
            **percentiles(latencies)}


def health(url: str) -> dict:
    import httpx

    return httpx.get(url.removesuffix("/v1") + "/health").json()


def measure_model(model_dir: Path, pairs, args) -> dict:
    from medmvl_cli.inference.generate import GenerationSettings, Predictor
    from medmvl_cli.serve.app import ServeSettings
    from medmvl_cli.serve.server import serve_in_thread

    predictor = Predictor(model_dir)
    predictor.generate([pairs[0][1]], GenerationSettings(max_new_tokens=2))  # warm-up
    # In a worker thread, as the server's model thread: on a loaded machine torch's threads behave
    # very differently in the main thread (measured here: 1 vs 40 requests/s for the tiny model).
    with ThreadPoolExecutor(max_workers=1) as worker:
        alone = worker.submit(one_by_one, predictor, pairs, args.new_tokens).result()
    result = {"requests": len(pairs), "one_by_one": alone}
    for concurrency in args.concurrency:
        predictor.clear_feature_cache()
        settings = ServeSettings(max_batch_size=args.max_batch_size, batch_window_s=args.window_ms / 1000)
        with serve_in_thread(predictor, settings) as url:
            before = health(url)
            figures = asyncio.run(load(url, predictor.name, pairs, concurrency, args.new_tokens))
            after = health(url)
        figures.update(batches=after["batches"] - before["batches"], largest_batch=after["largest_batch"])
        result[f"concurrency_{concurrency}"] = figures
        logger.info("%s concurrency %d: %s", model_dir.parent.parent.name, concurrency, figures)
    return result


def measure_cache(model_dir: Path, pairs, args) -> dict:
    from medmvl_cli.inference.generate import Predictor
    from medmvl_cli.serve.app import ServeSettings
    from medmvl_cli.serve.server import serve_in_thread

    out = {}
    for name, size in (("cache_on", 64), ("cache_of_one", 1)):
        predictor = Predictor(model_dir, feature_cache_size=size)
        with serve_in_thread(predictor, ServeSettings(max_batch_size=args.max_batch_size)) as url:
            figures = asyncio.run(load(url, predictor.name, pairs, 1, args.new_tokens))
            figures["volumes_encoded"] = health(url)["volumes_encoded"]
        out[name] = figures
    out["speedup"] = round(out["cache_on"]["requests_per_s"] / out["cache_of_one"]["requests_per_s"], 2)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick small model, 32 requests, 8 new tokens")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.new_tokens = min(args.requests, 32), min(args.new_tokens, 8)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    out = results_stream()
    import torch

    from medmvl_cli.data.synth import synthesize

    report = {"torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
              "max_batch_size": args.max_batch_size, "batch_window_ms": args.window_ms}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        root = Path(tmp)
        synthesize(root / "data", kind="both", n=16, seed=1, volume_size=(32, 64, 64), questions="easy")
        for name in args.models.split(","):
            if name == "tiny":
                model_dir = build_tiny(root / "tiny")
                pairs = requests_for(root / "data", ("2d", "3d"), args.requests)
            else:
                model_dir = build_saved_model(root / "small", SIZES["quick" if args.quick else "full"])
                pairs = requests_for(root / "data", ("3d",), args.requests)
            report[name] = measure_model(model_dir, pairs, args)
            if name == "small":
                interleaved = requests_for(root / "data", ("3d",), min(args.requests, 24), interleave=True)
                report[name]["feature_cache"] = measure_cache(model_dir, interleaved, args)
    out.write(json.dumps(report, indent=2) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
