"""Inference throughput (items/s) on multi-question files, with and without prefix reuse.

A small random-init two-branch model (a CLIP tower on 64 px images, 64 tokens; a MONAI 3D ViT on
(32, 128, 128) volumes, 4x16x16 patches, pooled 1x1x2 to 256 LLM tokens, as many as M3D-CLIP
gives; a Qwen2 LLM of hidden 384, 6 layers, --quick 256, 4) is built from a recipe with
`build_model` and saved with `save_model` into a temporary run folder; nothing is trained. Two
annotation files ask each file several questions (default 4: a report request and short
questions, test-style records ending on the question): a CT-RATE-shaped one over synthetic CT
volumes and a 2D one over synthetic films. Each configuration loads a fresh `Predictor` and
answers a whole file with `predict_file` (volume feature cache on); items/s is questions answered
per wall-clock second of `predict_file` (reading, encoding, generating, writing rows). With
prefix reuse, the questions of a file that share a batch prefill their common prompt prefix
(template head + the file's image tokens) once; without (`--no-prefix-cache`), every question
prefills it again. Both read the next batch's volumes on a background thread while a batch
generates where a core is free for it (`Predictor.reads_ahead`: a GPU, or fewer torch threads
than CPUs; run with OMP_NUM_THREADS=1 on 2 cores to see it); `baseline` does neither (each batch reads its own volumes, every question prefills its
whole prompt): the medmvl issue 16 was measured on, `speedup_vs_baseline`. Answers have a fixed length (min_new_tokens = max_new_tokens), so that random
weights do not end them at random points; greedy decoding; both ways must write the same answers.

Decode: the time of one generation step of the LLM (from answers of N and of 1 tokens, same
prompts) at batch 1 and the largest batch size, and the GFLOP/s it reaches (2 x LLM parameters
per token) against the fp32 matmul peak measured in the same run; the weight bytes it reads a
second (a step reads every weight once) against the memory bandwidth of a large copy measured in
the same run, the limit of small batches, whose matmuls are matrix-vector products; and the
share of a step spent inside the LLM's forward (the rest: generate's loop, logits processing,
the cache's upkeep).

    python benchmarks/infer_throughput.py [--quick] [--files 16] [--questions-per-file 4] [--new-tokens 32]
                                          [--batch-sizes 1,8,32] [--dims 3d,2d] [--rounds 1]
                                          [--source-size 64,256,256] [--no-feature-cache-runs]
                                          [--features read|precomputed]

On a shared machine pass --rounds 2 or 3: configurations then run round-robin and each keeps its
fastest round. `--no-feature-cache-runs` adds 3D runs that encode the volume for every question.
`--features precomputed` reads and encodes every volume before the clock starts: items/s then
measures what prefix reuse changes (the LLM's prefill and decode); with the small models here,
reading and resampling the volumes otherwise takes most of the time.

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
    IMAGE_SIZE,
    SIZES,
    VOLUME_PATCH,
    VOLUME_SIZE,
    matmul_peak_gflops,
    report_sentences,
    results_stream,
    write_clip,
    write_llm,
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
SHORT_QUESTIONS_2D = [
    "Is there a pneumothorax?",
    "Is the cardiac silhouette enlarged?",
    "Which side holds the opacity?",
    "Is there a rib fracture?",
    "Are the costophrenic angles sharp?",
    "Is a central line present?",
    "Is the trachea midline?",
]
REPORT_QUESTION_2D = "Describe the findings in this chest film."
VOLUME_POOL = (1, 1, 2)  # (8, 8, 8) patches -> 256 tokens a volume


def write_annotations(path: Path, files: list[str], dim: str, per_file: int, seed: int = 0) -> int:
    """`per_file` questions about each file: a report request and short questions, as CT-RATE's
    VQA files (3D) or VQA-RAD / SLAKE (2D) ask."""
    rng = np.random.default_rng(seed)
    sentences = report_sentences()
    report, short_questions = (REPORT_QUESTION, SHORT_QUESTIONS) if dim == "3d" else (REPORT_QUESTION_2D, SHORT_QUESTIONS_2D)
    key, placeholder = ("image3d", "<image3d>") if dim == "3d" else ("image", "<image>")
    records = []
    for f, file in enumerate(files):
        short = rng.choice(len(short_questions), per_file - 1, replace=False)
        questions = [report] + [short_questions[i] for i in short]
        for q, question in enumerate(questions):
            answer = (" ".join(sentences[i] for i in rng.choice(len(sentences), 6, replace=False))
                      if question == report else str(rng.choice(["Yes.", "No."])))
            records.append({"id": f"{dim}-{f:04d}-q{q}", key: [file],
                            "conversations": [{"from": "human", "value": f"{placeholder}\n{question}"}],
                            "answer": answer, "question_type": "open" if question == report else "closed"})
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return len(records)


def build_saved_model(folder: Path, sizes: dict) -> Path:
    """A recipe with the small LLM, a random-init CLIP tower and a random-init vit3d; built and
    saved as a run's model/."""
    import yaml

    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.inference.load import build
    from medmvl_cli.model.builder import save_model

    llm = write_llm(folder / "llm", sizes["llm"])
    clip = write_clip(folder / "clip", sizes["clip"])
    tree = {
        "stage": "finetune", "output_dir": str(folder / "run"),
        "model": {
            "llm": {"path": str(llm), "max_length": 512, "dtype": "float32"},
            "image": {"encoder": {"type": "clip", "path": str(clip), "select_layer": -1, "select_feature": "patch"},
                      "connector": {"type": "mlp", "depth": 2}},
            "image3d": {"encoder": {"type": "vit3d", "patch_size": list(VOLUME_PATCH), **sizes["vit3d"]},
                        "connector": {"type": "spatial_pooling", "pool": list(VOLUME_POOL), "depth": 2},
                        "volume": {"size": list(VOLUME_SIZE), "crop_foreground": False}},
        },
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    recipe = load_recipe(folder / "recipe.yaml", stage="finetune")
    model, processor = build(recipe, dtype="float32")
    return save_model(model, folder / "run" / "model", processor)


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
        tensor = predictor.processor.volumes([path])
        load.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            predictor.model.encode_volumes(tensor)
        encode.append(time.perf_counter() - start)
    return {"volume_read_preprocess_s": round(statistics.median(load), 3),
            "volume_encode_s": round(statistics.median(encode), 3)}


def run_config(model_dir: Path, annotations: Path, out: Path, settings, batch_size: int, cache: bool,
               prefix: bool, precompute: bool, read_ahead: bool = True) -> dict:
    from medmvl_cli.data.annotations import AnnotationFile, default_root, parse_record
    from medmvl_cli.inference.generate import Predictor
    from medmvl_cli.inference.predictions import predict_file, to_question

    predictor = Predictor(model_dir)
    if not read_ahead:  # the baseline: each batch reads its volumes itself
        predictor.read_ahead = lambda requests: None
    root = default_root(annotations, None)
    questions = [to_question(parse_record(r), root, root) for r in AnnotationFile(annotations)]
    one = type(settings)(max_new_tokens=1)
    # Warm-up (leaves the cache empty), or every volume read and encoded before the clock starts;
    # neither keeps a prompt prefix.
    warm = {str(q.request.volumes): q.request for q in questions} if precompute and cache else {}
    predictor.generate([questions[0].request], one, use_feature_cache=bool(warm))
    for request in warm.values():
        predictor.generate([request], one)
    predictor.cache_hits = 0
    start = time.perf_counter()
    counts = predict_file(predictor, annotations, out, settings, batch_size=batch_size, overwrite=True,
                          use_feature_cache=cache, reuse_prefix=prefix)
    seconds = time.perf_counter() - start
    return {
        "items": counts["asked"], "errors": counts["errors"], "seconds": round(seconds, 2),
        "items_per_s": round(counts["asked"] / seconds, 3),
        "generated_tokens_per_s": round(counts["asked"] * settings.max_new_tokens / seconds, 1),
        "feature_cache_hits": predictor.cache_hits, "prefix_tokens_reused": predictor.prefix_tokens_reused,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "_rows": out.read_bytes(),
    }


def memory_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Best GB/s of copying a large fp32 tensor (bytes read + bytes written), with the process's
    torch threads: the roofline of a decoding step at small batch, which reads every weight once."""
    import torch

    source = torch.randn(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best / 1e9


def decode_step(model_dir: Path, annotations: Path, settings, batch_size: int, peak_gflops: float,
                bandwidth_gbs: float) -> dict:
    """Milliseconds per generated token (one decoding step for the whole batch): the time of
    answers of N tokens less that of 1 token, over N - 1; and its GFLOP/s against the peak."""
    from medmvl_cli.data.annotations import AnnotationFile, default_root, parse_record
    from medmvl_cli.inference.generate import Predictor
    from medmvl_cli.inference.predictions import to_question

    predictor = Predictor(model_dir)
    root = default_root(annotations, None)
    records = [parse_record(r) for r in AnnotationFile(annotations)][:batch_size]
    requests = [to_question(r, root, root).request for r in records]
    requests = (requests * batch_size)[:batch_size]
    one = type(settings)(max_new_tokens=1)

    # Seconds inside the LLM's forward (its matmuls, attention, norms; HF's per-call mask and
    # position bookkeeping included): the rest of a step is generate's loop and the cache's upkeep.
    inside = [0.0]
    hooks = [predictor.model.llm.register_forward_pre_hook(lambda *_: inside.append(time.perf_counter())),
             predictor.model.llm.register_forward_hook(
                 lambda *_: inside.__setitem__(0, inside[0] + time.perf_counter() - inside.pop()))]

    def best(run_settings) -> tuple[float, float]:
        times = []
        for _ in range(3):
            inside[0] = 0.0
            begin = time.perf_counter()
            predictor.generate(requests, run_settings)
            times.append((time.perf_counter() - begin, inside[0]))
        return min(times)

    best(one)  # warm-up; the features are cached from here on
    (total_n, llm_n), (total_1, llm_1) = best(settings), best(one)
    for hook in hooks:
        hook.remove()
    step_s = (total_n - total_1) / (settings.max_new_tokens - 1)
    llm_share = (llm_n - llm_1) / max(total_n - total_1, 1e-9)
    llm_params = sum(p.numel() for p in predictor.model.llm.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in predictor.model.llm.parameters())
    gflops = 2 * llm_params * batch_size / step_s / 1e9
    weights_gbs = weight_bytes / step_s / 1e9  # every weight is read once a step, whatever the batch
    return {"batch_size": batch_size, "ms_per_step": round(step_s * 1e3, 2),
            "ms_per_token": round(step_s * 1e3 / batch_size, 3), "tokens_per_s": round(batch_size / step_s, 1),
            "gflops": round(gflops, 2), "fraction_of_matmul_peak": round(gflops / peak_gflops, 4),
            "weights_read_gb_per_s": round(weights_gbs, 2),
            "fraction_of_memory_bandwidth": round(weights_gbs / bandwidth_gbs, 4),
            "llm_forward_share_of_step": round(llm_share, 3)}


def make_files(folder: Path, dim: str, n_files: int, per_file: int, source_size: tuple) -> Path:
    """Synthetic films or CT volumes and an annotation file asking `per_file` questions about each."""
    from medmvl_cli.data.synth import synthesize

    data = folder / f"data-{dim}"
    synthesize(data, kind=dim, n=n_files, volume_size=source_size, image_size=IMAGE_SIZE, questions="all")
    media = data / ("volumes" if dim == "3d" else "images")
    files = sorted(str(p.relative_to(data)) for p in media.iterdir())[:n_files]
    annotations = data / f"multi_question_{dim}.json"
    write_annotations(annotations, files, dim, per_file)
    return annotations


def configurations(dims: list[str], batch_sizes: list[int], no_feature_cache_runs: bool) -> list[tuple]:
    """(key, dim, batch size, feature cache, prefix reuse, read-ahead), per batch size back to back:
    prefix (medmvl's default), no_prefix (`--no-prefix-cache`), and baseline: no prefix reuse and
    no read-ahead of the next batch's volumes, the medmvl issue 16 measured."""
    out = []
    for dim in dims:
        for batch_size in batch_sizes:
            out.append((f"{dim}_batch_{batch_size}_prefix", dim, batch_size, True, True, True))
            out.append((f"{dim}_batch_{batch_size}_no_prefix", dim, batch_size, True, False, True))
            out.append((f"{dim}_batch_{batch_size}_baseline", dim, batch_size, True, False, False))
            if dim == "3d" and no_feature_cache_runs:
                out.append((f"3d_batch_{batch_size}_no_feature_cache", dim, batch_size, False, False, False))
    return out


def main(argv: list[str] | None = None, out_stream=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller LLM and encoders")
    parser.add_argument("--files", type=int, default=16, help="CT volumes / films per file (default 16)")
    parser.add_argument("--questions-per-file", type=int, default=4, help="questions about each volume / film")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--dims", default="3d,2d")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each configuration runs (interleaved); the fastest is kept (shared machines)")
    parser.add_argument("--source-size", default="64,256,256",
                        help="D,H,W of the synthetic CT files (preprocessed to 32,128,128 when read)")
    parser.add_argument("--no-feature-cache-runs", action="store_true",
                        help="also 3D runs that encode the volume for every question")
    parser.add_argument("--features", choices=["read", "precomputed"], default="read",
                        help="read: files are read and encoded inside the timed run (end to end); precomputed: "
                             "before it, so items/s measures the LLM's prefill and decode")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    import torch

    sizes = SIZES["quick" if args.quick else "full"]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    dims = args.dims.split(",")
    source_size = tuple(int(x) for x in args.source_size.split(","))
    settings = settings_class()(max_new_tokens=args.new_tokens)
    load_start = os.getloadavg()
    peak_before = matmul_peak_gflops()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medmvl-infer-bench-") as tmp:
        folder = Path(tmp)
        model_dir = build_saved_model(folder, sizes)
        files = {dim: make_files(folder, dim, args.files, args.questions_per_file, source_size) for dim in dims}

        from medmvl_cli.inference.generate import Predictor

        probe = Predictor(model_dir)
        breakdown = stage_times(probe, sorted((files["3d"].parent / "volumes").iterdir())[:3]) if "3d" in dims else {}
        prompt_tokens = {dim: [len(probe.prompt_ids([{"role": "user", "content": f"{ph}\n{q}"}])) for q in questions]
                         for dim, ph, questions in (("3d", "<image3d>", SHORT_QUESTIONS + [REPORT_QUESTION]),
                                                    ("2d", "<image>", SHORT_QUESTIONS_2D + [REPORT_QUESTION_2D]))
                         if dim in dims}
        del probe

        runs: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for key, dim, batch_size, cache, prefix, ahead in configurations(dims, batch_sizes, args.no_feature_cache_runs):
                run = run_config(model_dir, files[dim], folder / f"{key}.jsonl", settings, batch_size, cache, prefix,
                                 args.features == "precomputed", read_ahead=ahead)
                logger.info("round %d, %s: %.3f items/s", round_ + 1, key, run["items_per_s"])
                if key not in runs or run["items_per_s"] > runs[key]["items_per_s"]:
                    runs[key] = run
        for dim in dims:
            for batch_size in batch_sizes:
                with_prefix, without = runs[f"{dim}_batch_{batch_size}_prefix"], runs[f"{dim}_batch_{batch_size}_no_prefix"]
                with_prefix["speedup_vs_no_prefix"] = round(with_prefix["items_per_s"] / without["items_per_s"], 2)
                with_prefix["same_rows_as_no_prefix"] = with_prefix["_rows"] == without["_rows"]
                baseline = runs[f"{dim}_batch_{batch_size}_baseline"]
                with_prefix["speedup_vs_baseline"] = round(with_prefix["items_per_s"] / baseline["items_per_s"], 2)
                with_prefix["same_rows_as_baseline"] = with_prefix["_rows"] == baseline["_rows"]
        for run in runs.values():
            run.pop("_rows")
        peak = matmul_peak_gflops()
        bandwidth = memory_bandwidth_gbs()
        decode = {f"batch_{b}": decode_step(model_dir, files[dims[0]], settings, b, max(peak_before, peak), bandwidth)
                  for b in sorted({min(batch_sizes), max(batch_sizes)})}
    out = {
        "benchmark": "infer_throughput",
        "quick": args.quick, "rounds_fastest_kept": args.rounds,
        "model_sizes": {"llm": sizes["llm"], "clip": sizes["clip"], "vit3d": sizes["vit3d"]},
        "image_size": IMAGE_SIZE, "volume_size": list(VOLUME_SIZE), "source_volume_size": list(source_size),
        "files_per_dim": args.files, "questions_per_file": args.questions_per_file,
        "new_tokens_per_answer": args.new_tokens, "decoding": "greedy, fixed length", "features": args.features,
        "prompt_tokens": {dim: {"min": min(t), "max": max(t)} for dim, t in prompt_tokens.items()},
        "per_volume": breakdown,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "matmul_peak_gflops": {"before": round(peak_before, 1), "after": round(peak, 1)},
        "memory_bandwidth_gb_per_s": round(bandwidth, 1),
        "load_average": {"start": [round(x, 2) for x in load_start],
                         "end": [round(x, 2) for x in os.getloadavg()]},
        "decode": decode,
        "total_s": round(time.perf_counter() - started, 1),
        "runs": runs,
    }
    print(json.dumps(out, indent=2), file=out_stream or sys.stdout, flush=True)
    return out


if __name__ == "__main__":
    main(out_stream=results_stream())
