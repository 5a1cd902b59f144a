"""Inference throughput (items/s) at batch 1 / 4 / 16, with and without the volume feature cache.

A small random-init 3D model (MONAI 3D ViT on (32, 128, 128) volumes, 4x16x16 patches, pooled
2x2x2 to 64 LLM tokens; a Qwen2 LLM of hidden 384, 6 layers, --quick 256, 4) is built from a
recipe with `build_model` and saved with `save_model` into a temporary run folder; nothing is
trained. A CT-RATE-shaped annotation file asks 3-5 questions per synthetic CT volume (short VQA
questions and a report request, test-style records ending on the question). Each configuration
loads a fresh `Predictor` and answers the whole file with `predict_file`; items/s is questions
answered per wall-clock second of `predict_file` (reading volumes, encoding, generating, writing
rows). Without the cache every question reads, preprocesses and encodes its volume; with it, each
volume once. Answers have a fixed length (min_new_tokens = max_new_tokens), so that random
weights do not end them at random points; greedy decoding.

    python benchmarks/infer_throughput.py [--quick] [--volumes 16] [--new-tokens 32] [--batch-sizes 1,4,16]
                                          [--rounds 1] [--source-size 64,256,256]

On a shared machine pass --rounds 2 or 3: configurations then run round-robin and each keeps its
fastest round.

Prints one JSON object on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (  # noqa: E402  (sibling benchmark: the same LLM and report sentences)
    SIZES, VOLUME_PATCH, VOLUME_SIZE, matmul_peak_gflops, report_sentences, results_stream, write_llm,
)

logger = logging.getLogger("benchmarks.infer_throughput")

SHORT_QUESTIONS = [
    "Is there a lung nodule?",
    "Is there a pleural effusion?",
    "Which lobe holds the largest nodule?",
    "Is the heart size within normal limits?",
    "Is there evidence of emphysema?",
    "Are there enlarged mediastinal lymph nodes?",
    "Is there consolidation in the lower lobes?",
]
REPORT_QUESTION = "Write the findings and impression for this chest CT."


def write_annotations(path: Path, volumes: list[str], seed: int = 0) -> int:
    """3-5 questions per volume: a report request and short questions, as CT-RATE's VQA files."""
    rng = np.random.default_rng(seed)
    sentences = report_sentences()
    records = []
    for v, volume in enumerate(volumes):
        count = int(rng.integers(3, 6))
        short = rng.choice(len(SHORT_QUESTIONS), count - 1, replace=False)
        questions = [REPORT_QUESTION] + [SHORT_QUESTIONS[i] for i in short]
        for q, question in enumerate(questions):
            answer = (" ".join(sentences[i] for i in rng.choice(len(sentences), 6, replace=False))
                      if question == REPORT_QUESTION else str(rng.choice(["Yes.", "No."])))
            records.append({"id": f"ct-{v:04d}-q{q}", "image3d": [volume],
                            "conversations": [{"from": "human", "value": f"<image3d>\n{question}"}],
                            "answer": answer,
                            "question_type": "open" if question == REPORT_QUESTION else "closed"})
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return len(records)


def build_saved_model(folder: Path, sizes: dict) -> Path:
    """A recipe with the small LLM and a random-init vit3d; built and saved as a run's model/."""
    import yaml

    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.model.builder import build_model, save_model

    llm = write_llm(folder / "llm", sizes["llm"])
    tree = {
        "stage": "finetune", "output_dir": str(folder / "run"),
        "model": {
            "llm": {"path": str(llm), "max_length": 512, "dtype": "float32"},
            "image3d": {"encoder": {"type": "vit3d", "patch_size": list(VOLUME_PATCH), **sizes["vit3d"]},
                        "connector": {"type": "spatial_pooling", "pool": 2, "depth": 2},
                        "volume": {"size": list(VOLUME_SIZE), "crop_foreground": False}},
        },
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    recipe = load_recipe(folder / "recipe.yaml", stage="finetune")
    model, tokenizer, processor = build_model(recipe, dtype="float32")
    return save_model(model, folder / "run" / "model", tokenizer=tokenizer, image_processor=processor)


def settings_class():
    from medmvl_cli.inference.generate import GenerationSettings

    @dataclass
    class FixedLengthSettings(GenerationSettings):
        """Greedy answers of exactly max_new_tokens tokens (random weights would stop anywhere)."""

        def kwargs(self, pad_token_id, stop_token_ids):
            return {**super().kwargs(pad_token_id, stop_token_ids), "min_new_tokens": self.max_new_tokens}

    return FixedLengthSettings


def stage_times(predictor, volumes: list[Path]) -> dict:
    """Median seconds to read + preprocess one volume and to encode it (encoder + connector)."""
    import torch

    load, encode = [], []
    for path in volumes:
        start = time.perf_counter()
        tensor = predictor.media.volumes([path])
        load.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            predictor.model.encode_volumes(tensor)
        encode.append(time.perf_counter() - start)
    return {"volume_read_preprocess_s": round(statistics.median(load), 3),
            "volume_encode_s": round(statistics.median(encode), 3)}


def run_config(model_dir: Path, annotations: Path, out: Path, settings, batch_size: int, cache: bool) -> dict:
    from medmvl_cli.data.annotations import AnnotationFile, default_root, parse_record
    from medmvl_cli.inference.generate import Predictor
    from medmvl_cli.inference.predictions import predict_file, to_question

    predictor = Predictor(model_dir)
    first_record = parse_record(next(iter(AnnotationFile(annotations))))
    first = to_question(first_record, None, default_root(annotations, None))
    predictor.generate([first.request], settings, use_feature_cache=False)  # warm-up; leaves the cache empty
    start = time.perf_counter()
    counts = predict_file(predictor, annotations, out, settings, batch_size=batch_size, overwrite=True,
                          use_feature_cache=cache)
    seconds = time.perf_counter() - start
    predictions = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    return {
        "items": counts["asked"], "errors": counts["errors"], "seconds": round(seconds, 2),
        "items_per_s": round(counts["asked"] / seconds, 3),
        "generated_tokens_per_s": round(counts["asked"] * settings.max_new_tokens / seconds, 1),
        "feature_cache_hits": predictor.cache_hits, "load_average_1min_after": round(os.getloadavg()[0], 2),
        "_predictions": predictions,
    }


def main(argv: list[str] | None = None, out_stream=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller LLM / encoder, fewer volumes and tokens")
    parser.add_argument("--volumes", type=int, default=None,
                        help="CT volumes (3-5 questions each; default 16, --quick 8)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per answer (default 32, --quick 16)")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each configuration runs (interleaved); the fastest is kept (shared machines)")
    parser.add_argument("--source-size", default="64,256,256",
                        help="D,H,W of the synthetic CT files (preprocessed to 32,128,128 when read)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from medmvl_cli.data.synth import synthesize

    sizes = SIZES["quick" if args.quick else "full"]
    n_volumes = args.volumes or (8 if args.quick else 16)
    new_tokens = args.new_tokens or (16 if args.quick else 32)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    source_size = tuple(int(x) for x in args.source_size.split(","))
    settings = settings_class()(max_new_tokens=new_tokens)
    load_start = os.getloadavg()
    peak_before = matmul_peak_gflops()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medmvl-infer-bench-") as tmp:
        folder = Path(tmp)
        model_dir = build_saved_model(folder, sizes)
        data = folder / "data"
        synthesize(data, kind="3d", n=n_volumes, volume_size=source_size, questions="all")
        volumes = sorted(str(p.relative_to(data)) for p in (data / "volumes").iterdir())
        annotations = data / "ct_rate_like.json"
        questions = write_annotations(annotations, volumes)
        logger.info("%d questions over %d volumes", questions, len(volumes))

        from medmvl_cli.inference.generate import Predictor

        probe = Predictor(model_dir)
        breakdown = stage_times(probe, [data / v for v in volumes[:3]])
        prompt_tokens = [len(probe.prompt_ids([{"role": "user", "content": f"<image3d>\n{q}"}]))
                         for q in SHORT_QUESTIONS + [REPORT_QUESTION]]
        del probe

        runs: dict[str, dict] = {}
        for round_ in range(args.rounds):
            # With and without the cache back to back, rounds interleaved: the machine may be shared.
            for batch_size in batch_sizes:
                for cache in (True, False):
                    key = f"batch_{batch_size}_{'cache' if cache else 'no_cache'}"
                    run = run_config(model_dir, annotations, folder / f"{key}.jsonl", settings, batch_size, cache)
                    logger.info("round %d, %s: %.3f items/s", round_ + 1, key, run["items_per_s"])
                    if key not in runs or run["items_per_s"] > runs[key]["items_per_s"]:
                        runs[key] = run
        for batch_size in batch_sizes:
            with_cache, without = runs[f"batch_{batch_size}_cache"], runs[f"batch_{batch_size}_no_cache"]
            with_cache["speedup_vs_no_cache"] = round(with_cache["items_per_s"] / without["items_per_s"], 2)
            with_cache["same_answers_as_no_cache"] = with_cache["_predictions"] == without["_predictions"]
        for run in runs.values():
            run.pop("_predictions")
    out = {
        "benchmark": "infer_throughput",
        "quick": args.quick, "rounds_fastest_kept": args.rounds,
        "model_sizes": {"llm": sizes["llm"], "vit3d": sizes["vit3d"]},
        "volume_size": list(VOLUME_SIZE), "source_volume_size": list(source_size),
        "volumes": len(volumes), "questions": questions,
        "questions_per_volume": round(questions / len(volumes), 2),
        "new_tokens_per_answer": new_tokens, "decoding": "greedy, fixed length",
        "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens)},
        "per_volume": breakdown,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "matmul_peak_gflops": {"before": round(peak_before, 1), "after": round(matmul_peak_gflops(), 1)},
        "load_average": {"start": [round(x, 2) for x in load_start],
                         "end": [round(x, 2) for x in os.getloadavg()]},
        "total_s": round(time.perf_counter() - started, 1),
        "runs": runs,
    }
    print(json.dumps(out, indent=2), file=out_stream or sys.stdout, flush=True)
    return out


if __name__ == "__main__":
    main(out_stream=results_stream())
