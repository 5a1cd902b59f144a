"""Training throughput of a small (not tiny) model: padded vs length-grouped vs packed batches.

For each branch (2D: a CLIP tower + MLP connector; 3D: a MONAI 3D ViT + spatial pooling) and
each batching mode (`padded`: random order, right-padded; `grouped`: `data.group_by_length`;
`packed`: `data.packing`, padding-free), one run goes through the real `train_stage` (finetune
stage defaults: LLM and connector train, encoder frozen) in its own process, for --steps
optimizer steps over exactly --steps x --batch-size records: every mode sees the same records
once. The LLM is a random-init Qwen2 (hidden 384, 6 layers; --quick: 256, 4) with the packaged
qwen2 tokenizer. Annotations mix short VQA answers with long multi-sentence reports (sentences of
the packaged radiology corpus) over `synthesize` media; 3D volumes are preprocessed into the
volume cache first, so the runs time training, not CT reading.

Figures per run, from its metrics.jsonl (one line per step; step 1 is skipped as warm-up):
tokens/s (real tokens, image tokens included, padding excluded); samples/s = tokens/s over the
mean sample length of the run's records (`samples_per_s_timed_steps`, the raw rate of steps 2..N,
flatters `grouped`, whose skipped step 1 is its longest batch); peak RSS of the run's process;
padding share of the batches (rebuilt from the sampler); model FLOPs utilisation
against an fp32 matmul peak timed in the same run. FLOPs counted: 6 x all LLM parameters x tokens
(forward + backward; tied embeddings counted once, as the output projection; attention scores not
counted); `mfu_with_vision` adds 2 x encoder parameters x encoder tokens (frozen: forward only)
and 6 x connector parameters x image tokens.

    python benchmarks/train_throughput.py [--quick] [--steps 24] [--batch-size 8] [--dims 2d,3d]
                                          [--modes padded,grouped,packed,packed_dense]
                                          [--isolated [--rounds 1]]

By default the modes run in one process, their steps interleaved (padded, grouped, packed,
packed_dense, padded, ...; forward + backward + AdamW, batches collated beforehand), and each
reports tokens/s over its steps and the median per-step rate: fair on a shared machine, and each mode names its attention
path (`packed`: the path `use_packed_attention` picks here; `packed_dense`: packing through the
dense block-diagonal mask, the fallback, for comparison). The first batch's loss of padded, packed
and packed_dense is compared (`losses_agree`). --isolated runs the real `train_stage` per mode
instead, as described below.

--quick: LLM hidden 256 / 4 layers, CLIP and 3D ViT hidden 128 / 2 layers, 10 steps (a few
minutes on 2 idle cores). On a shared machine pass --rounds 2 or 3: the modes then run
round-robin and each keeps its fastest run; `tokens_per_s_median_step` is a second figure that
one slow step does not move. Padded and packed runs see identical batches (same order), so their
final losses agree: a check that packing computes the same thing.

Prints one JSON object on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("benchmarks.train_throughput")

MODES = {
    "padded": ["data.group_by_length=false", "data.packing=false"],
    "grouped": ["data.group_by_length=true", "data.packing=false"],
    "packed": ["data.group_by_length=false", "data.packing=true"],
}
# LLM (Qwen2), 2D tower (CLIP) and 3D ViT sizes; the 3D ViT sees (32, 128, 128) volumes in
# 4x16x16 patches (512 tokens, pooled 2x2x2 to 64 LLM tokens); CLIP sees 64 px in 8 px patches.
SIZES = {
    "full": {"llm": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
                     "num_attention_heads": 6, "num_key_value_heads": 2},
             "clip": {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4},
             "vit3d": {"hidden_size": 192, "num_layers": 4, "num_heads": 4}},
    "quick": {"llm": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
                      "num_attention_heads": 4, "num_key_value_heads": 2},
              "clip": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4},
              "vit3d": {"hidden_size": 128, "num_layers": 2, "num_heads": 4}},
}
IMAGE_SIZE, PATCH = 64, 8
VOLUME_SIZE, VOLUME_PATCH = (32, 128, 128), (4, 16, 16)
MAX_LENGTH = 512

SHORT_QUESTIONS = [  # (question, answers)
    ("Is there a lesion in the lungs?", ["Yes.", "No."]),
    ("Which lung has the lesion?", ["Left.", "Right.", "The right lung."]),
    ("How many nodules are visible?", ["One.", "Two.", "Three."]),
    ("Is there a pleural effusion?", ["No.", "Yes, on the left."]),
    ("What imaging modality is this?", ["Chest X-ray.", "CT of the chest."]),
    ("Where is the largest nodule?", ["In the right upper lobe.", "Left lower lobe."]),
    ("Is the heart size normal?", ["Yes.", "No, it is enlarged."]),
]
REPORT_QUESTIONS = [
    "Write the findings and impression for this study.",
    "Describe the findings in detail.",
    "Generate a radiology report for this scan.",
]


# ------------------------------------------------------------------------------------- models
def write_llm(folder: Path, fields: dict) -> Path:
    """A random-init Qwen2 causal LM with the packaged qwen2 tokenizer, as an HF folder."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from medmvl_cli.model.presets.tokenizer_files import preset_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(preset_tokenizer_dir("qwen2"))
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=4096, tie_word_embeddings=True, **fields)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_clip(folder: Path, fields: dict) -> Path:
    """A random-init CLIP vision tower with its image processor, as an HF folder."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, **fields)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


def model_section(dim: str, folders: dict, sizes: dict) -> dict:
    llm = {"path": str(folders["llm"]), "max_length": MAX_LENGTH, "dtype": "float32",
           "attn_implementation": "sdpa"}
    if dim == "2d":
        return {"llm": llm, "image": {
            "encoder": {"type": "clip", "path": str(folders["clip"]), "select_layer": -1, "select_feature": "patch"},
            "connector": {"type": "mlp", "depth": 2}}}
    return {"llm": llm, "image3d": {
        "encoder": {"type": "vit3d", "patch_size": list(VOLUME_PATCH), **sizes["vit3d"]},
        "connector": {"type": "spatial_pooling", "pool": 2, "depth": 2},
        "volume": {"size": list(VOLUME_SIZE), "crop_foreground": False}}}


# --------------------------------------------------------------------------------------- data
def report_sentences() -> list[str]:
    from medmvl_cli.model.presets import models

    corpus = Path(models.__file__).with_name("corpus.txt").read_text(encoding="utf-8")
    return [line.strip() for line in corpus.splitlines() if line.strip().endswith(".") and len(line.split()) >= 5]


def write_annotations(path: Path, media: list[str], dim: str, count: int, seed: int = 0) -> dict:
    """`count` records over `media`, several questions per file: 2D ~30 % reports, 3D one report
    per volume among 4 questions (CT-RATE-like). Reports are 3-14 corpus sentences."""
    rng = np.random.default_rng(seed)
    sentences = report_sentences()
    per_file = 2 if dim == "2d" else 4
    placeholder, key = ("<image>", "image") if dim == "2d" else ("<image3d>", "image3d")
    records, long_answers = [], 0
    for i in range(count):
        file = media[(i // per_file) % len(media)]
        report = (rng.random() < 0.3) if dim == "2d" else (i % per_file == 0)
        if report:
            question = REPORT_QUESTIONS[int(rng.integers(len(REPORT_QUESTIONS)))]
            picked = rng.choice(len(sentences), size=int(rng.integers(3, 15)), replace=False)
            answer = " ".join(sentences[j] for j in picked)
            long_answers += 1
        else:
            question, answers = SHORT_QUESTIONS[int(rng.integers(len(SHORT_QUESTIONS)))]
            answer = answers[int(rng.integers(len(answers)))]
        records.append({"id": f"{dim}-{i:05d}", key: [file], "conversations": [
            {"from": "human", "value": f"{placeholder}\n{question}"}, {"from": "gpt", "value": answer}]})
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return {"records": count, "media_files": min(len(media), -(-count // per_file)),
            "report_share": round(long_answers / count, 3)}


def write_recipe(path: Path, dim: str, folders: dict, sizes: dict, data_dir: Path, annotations: Path,
                 steps: int, batch_size: int) -> Path:
    import yaml

    root_key = "image_root" if dim == "2d" else "volume_root"
    tree = {
        "stage": "finetune", "seed": 0, "output_dir": str(path.parent / "runs" / dim),
        "model": model_section(dim, folders, sizes),
        "data": {"train": [{"annotations": str(annotations), root_key: str(data_dir)}],
                 "cache_dir": str(data_dir / "volume-cache") if dim == "3d" else None,
                 "num_workers": 0, "group_by_length": False, "packing": False},
        "train": {"max_steps": steps, "batch_size": batch_size, "lr": 1e-4, "warmup_ratio": 0.0,
                  "lr_scheduler": "constant", "gradient_checkpointing": False, "logging_steps": 1,
                  "save_steps": 1_000_000, "report_to": ["none"]},
    }
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def prepare(folder: Path, dims: list[str], sizes: dict, steps: int, batch_size: int) -> dict[str, Path]:
    """Models, media, annotation files, recipes (and the filled volume cache) under `folder`."""
    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.data.synth import synthesize

    folders = {"llm": write_llm(folder / "llm", sizes["llm"])}
    if "2d" in dims:
        folders["clip"] = write_clip(folder / "clip", sizes["clip"])
    count = steps * batch_size
    recipes, data = {}, {}
    for dim in dims:
        data_dir = folder / f"data-{dim}"
        files = -(-count // (2 if dim == "2d" else 4))
        start = time.perf_counter()
        synthesize(data_dir, kind=dim, n=max(files, 2), image_size=IMAGE_SIZE, volume_size=VOLUME_SIZE,
                   questions="all")  # every file of both splits is used
        media_dir = data_dir / ("images" if dim == "2d" else "volumes")
        media = sorted(str(p.relative_to(data_dir)) for p in media_dir.iterdir())
        data[dim] = write_annotations(data_dir / "bench.json", media, dim, count)
        recipes[dim] = write_recipe(folder / f"{dim}.yaml", dim, folders, sizes, data_dir, data_dir / "bench.json",
                                    steps, batch_size)
        if dim == "3d":
            from medmvl_cli.data.volume_cache import VolumeCache

            recipe = load_recipe(recipes[dim], stage="finetune")
            report = VolumeCache(recipe.data.cache_dir).fill([data_dir / m for m in media],
                                                             recipe.model.image3d.volume)
            data[dim]["volumes_cached"] = report.built + report.cached
        data[dim]["prepare_s"] = round(time.perf_counter() - start, 1)
    return recipes, data


# ------------------------------------------------------------------------------- measurements
def results_stream():
    """A text stream on the real stdout, for the JSON alone; anything else written to stdout from
    now on (DeepSpeed logs there when transformers imports it) goes to stderr instead."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return stream


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n matmul with the process's torch threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def model_facts(recipe_path: Path, batch_size: int) -> dict:
    """Parameter counts, token counts per sample and the padding share of each mode's batches."""
    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.data.sampler import WeightedLengthGroupedSampler
    from medmvl_cli.engine.stages import build_datasets, build_training_model

    recipe = load_recipe(recipe_path, stage="finetune")
    model, processor = build_training_model(recipe)
    train, _ = build_datasets(recipe, processor)
    lengths = train.lengths
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in model.components().items()}
    trainable = {name: sum(p.numel() for p in module.parameters() if p.requires_grad)
                 for name, module in model.components().items()}
    branch = "image" if model.config.image is not None else "image3d"
    encoder = getattr(model, f"{branch}_encoder")
    encoder_tokens = encoder.layout.num_patches + int(bool(getattr(encoder, "has_cls", False)))  # CLS runs too
    padding = {}
    for mode, group in (("padded", False), ("grouped", True)):
        order = list(WeightedLengthGroupedSampler(lengths, train.source_indices, [1.0], batch_size, group,
                                                  recipe.seed))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        padding[mode] = round(1 - sum(lengths) / computed, 3)
    padding["packed"] = 0.0
    return {
        "params": params, "trainable": trainable,
        "image_tokens_per_sample": processor.tokens["<image>" if branch == "image" else "<image3d>"],
        "encoder_tokens_per_sample": encoder_tokens,
        "sample_tokens": {"min": min(lengths), "median": int(statistics.median(lengths)),
                          "p90": int(np.percentile(lengths, 90)), "max": max(lengths),
                          "mean": round(float(np.mean(lengths)), 1)},
        "padding_share": padding,
        "_encoder": f"{branch}_encoder", "_connector": f"{branch}_connector",
    }


def run_child(recipe: Path, mode: str, batch_size: int) -> dict:
    """One training run in this process; returns its figures (called via --child)."""
    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.engine.stages import train_stage

    output_dir = recipe.parent / "runs" / f"{recipe.stem}-{mode}"
    recipe_obj = load_recipe(recipe, MODES[mode] + [f"output_dir={output_dir}"], stage="finetune")
    before = matmul_peak_gflops(1536, 3)  # how much of the machine this run had (it is shared)
    start = time.perf_counter()
    run = train_stage(recipe_obj, overwrite=True, quiet=True)
    wall = time.perf_counter() - start
    after = matmul_peak_gflops(1536, 3)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = rows[1:]  # step 1: warm-up (lazy init, first allocations)
    # Every step holds exactly `batch_size` samples (the run is one epoch of steps x batch_size
    # records), so a step took batch_size / samples_per_s seconds; totals over steps, not a mean of rates.
    seconds = [batch_size / r["samples_per_s"] for r in timed]
    tokens = [r["tokens_per_s"] * s for r, s in zip(timed, seconds)]
    return {
        "steps_logged": len(rows), "steps_timed": len(timed),
        "tokens_per_s": round(sum(tokens) / sum(seconds), 1),
        "samples_per_s_timed_steps": round(batch_size * len(timed) / sum(seconds), 3),
        # The median of the per-step rates shrugs off another process taking the cores for a step or two.
        "tokens_per_s_median_step": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
        "step_s": [round(x, 2) for x in seconds],
        "train_stage_wall_s": round(wall, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "matmul_gflops_before_after": [round(before, 1), round(after, 1)],
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "final_loss": rows[-1].get("loss"),
    }


def interleaved(recipe_path: Path, modes: list[str], steps: int, batch_size: int) -> dict:
    """All modes in this process on one model, step by step in turn (A B C A B C ...), so a busy
    spell on a shared machine hits every mode alike. A step is forward + backward + AdamW on the
    trainable parts; batches are collated beforehand (media loading is not timed). Each mode's
    figure is its real tokens over its seconds, all steps (one untimed warm-up step per mode
    first), with the median of its per-step rates beside it. `packed_dense` is packing through the dense block-diagonal mask (the fallback path),
    for comparison."""
    import torch

    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.data.collator import LVLMCollator
    from medmvl_cli.data.sampler import WeightedLengthGroupedSampler
    from medmvl_cli.engine.stages import build_datasets, build_training_model
    from medmvl_cli.model.packed_attention import use_packed_attention

    recipe = load_recipe(recipe_path, stage="finetune")
    torch.manual_seed(0)
    model, processor = build_training_model(recipe)
    train, _ = build_datasets(recipe, processor)
    pad_token_id = processor.tokenizer.pad_token_id
    text_config = model.config.text_config
    plain = text_config._attn_implementation
    packed_path = use_packed_attention(model)  # padded batches (with a mask) still run plain SDPA
    packed_impl = text_config._attn_implementation
    impl = {"padded": packed_impl, "grouped": packed_impl, "packed": packed_impl, "packed_dense": plain}
    path = {"padded": f"{plain} (padding mask)", "grouped": f"{plain} (padding mask)", "packed": packed_path,
            "packed_dense": f"{plain} (dense block-diagonal mask)"}
    collators = {False: LVLMCollator(pad_token_id), True: LVLMCollator(pad_token_id, packing=True)}
    orders = {group: list(WeightedLengthGroupedSampler(train.lengths, train.source_indices, [1.0], batch_size, group,
                                                       recipe.seed)) for group in (False, True)}
    batches = {}
    for mode in modes:
        order = orders[mode == "grouped"]
        collate = collators[mode.startswith("packed")]
        batches[mode] = [collate([train[i] for i in order[s * batch_size:(s + 1) * batch_size]]) for s in range(steps)]

    def tokens(batch) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def forward(mode, batch):
        text_config._attn_implementation = impl[mode]
        return model(**batch).loss

    model.train()
    check = {}
    with torch.no_grad():  # the same records, the same weights: the modes must agree on the loss
        first = [i for i in orders[False][:batch_size]]
        for mode in ("padded", "packed", "packed_dense"):
            collate = collators[mode.startswith("packed")]
            check[mode] = round(float(forward(mode, collate([train[i] for i in first]))), 6)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for mode in modes:  # warm-up (lazy init, first allocations), untimed
        forward(mode, batches[mode][0]).backward()
        optimizer.zero_grad(set_to_none=True)
    seconds = {mode: [] for mode in modes}
    for step in range(steps):
        for mode in modes:
            start = time.perf_counter()
            forward(mode, batches[mode][step]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds[mode].append(time.perf_counter() - start)
    text_config._attn_implementation = plain
    runs = {}
    for mode in modes:
        counts = [tokens(b) for b in batches[mode]]
        timed = seconds[mode]
        runs[mode] = {
            "attention_path": path[mode],
            # All steps: every mode covers the same records (grouped's batches differ in size, so
            # the median of its per-step rates would favour its many short batches).
            "tokens_per_s": round(sum(counts) / sum(timed), 1),
            "tokens_per_s_median_step": round(statistics.median(n / t for n, t in zip(counts, timed)), 1),
            "step_s": [round(x, 2) for x in seconds[mode]],
            "tokens_per_step": [tokens(b) for b in batches[mode]],
        }
    return {"runs": runs, "loss_first_batch": check,
            "losses_agree": max(check.values()) - min(check.values()) < 1e-4}


def spawn(recipe: Path, mode: str, batch_size: int) -> dict:
    command = [sys.executable, __file__, "--child", str(recipe), "--mode", mode, "--batch-size", str(batch_size)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{recipe.stem} / {mode}: the training run failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None, out_stream=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 24; --quick 10)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smaller LLM / encoders and fewer steps (a few minutes)")
    parser.add_argument("--dims", default="2d,3d", help="branches to measure: 2d, 3d or both")
    parser.add_argument("--modes", default=None,
                        help="batching modes: padded, grouped, packed (+ packed_dense, interleaved only; "
                             "default: all of them)")
    parser.add_argument("--isolated", action="store_true",
                        help="one train_stage run per mode in its own process instead of the modes' steps "
                             "interleaved in one process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="--isolated: runs per mode (round-robin); the fastest is kept")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.child else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    out_stream = out_stream or sys.stdout
    from medmvl_cli import threads

    # medmvl's own thread policy (as `medmvl finetune` applies it): on a shared machine, threads
    # beyond the idle cores make every mode several times slower and the figures meaningless.
    policy = threads.current()
    if args.child:
        result = run_child(args.child, args.mode, args.batch_size)
        print(json.dumps(result), file=out_stream, flush=True)
        return result

    import torch

    steps = args.steps or (10 if args.quick else 24)
    dims = [d.strip() for d in args.dims.split(",") if d.strip()]
    modes = [m.strip() for m in (args.modes or ",".join(
        list(MODES) + ([] if args.isolated else ["packed_dense"]))).split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES and (args.isolated or m != "packed_dense")]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}")
    sizes = SIZES["quick" if args.quick else "full"]
    load_start = os.getloadavg()
    peak_before = matmul_peak_gflops()
    logger.info("fp32 matmul peak %.1f GFLOP/s (%d threads)", peak_before, torch.get_num_threads())
    results: dict = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medmvl-train-bench-") as tmp:
        recipes, data = prepare(Path(tmp), dims, sizes, steps, args.batch_size)
        for dim in dims:
            facts = model_facts(recipes[dim], args.batch_size)
            llm_params = facts["params"]["llm"]
            vision_flops_per_sample = (
                2 * facts["params"][facts["_encoder"]] * facts["encoder_tokens_per_sample"]
                + 6 * facts["params"][facts["_connector"]] * facts["image_tokens_per_sample"])
            runs: dict[str, dict] = {}
            if not args.isolated:
                logger.info("%s: %s interleaved, %d steps of %d", dim, ", ".join(modes), steps, args.batch_size)
                measured = interleaved(recipes[dim], modes, steps, args.batch_size)
                runs = measured.pop("runs")
                for mode, run in runs.items():
                    run["samples_per_s"] = round(run["tokens_per_s"] / facts["sample_tokens"]["mean"], 3)
                    run["padding_share"] = facts["padding_share"]["packed" if mode == "packed_dense" else mode]
                    logger.info("%s / %s (%s): %.1f tokens/s (median step %.1f)", dim, mode, run["attention_path"],
                                run["tokens_per_s"], run["tokens_per_s_median_step"])
                facts.update(measured)
            for round_ in range(args.rounds if args.isolated else 0):  # modes round-robin
                for mode in modes:
                    logger.info("round %d, %s / %s: %d steps of %d", round_ + 1, dim, mode, steps, args.batch_size)
                    run = spawn(recipes[dim], mode, args.batch_size)
                    # Over all the run's records: with group_by_length the warm-up step left out holds
                    # the longest batch, so the timed steps alone would overstate samples/s.
                    run["samples_per_s"] = round(run["tokens_per_s"] / facts["sample_tokens"]["mean"], 3)
                    run["padding_share"] = facts["padding_share"][mode]
                    logger.info("round %d, %s / %s: %s", round_ + 1, dim, mode, run)
                    if mode not in runs or run["tokens_per_s"] > runs[mode]["tokens_per_s"]:
                        runs[mode] = run
            shown = {k: v for k, v in facts.items() if not k.startswith("_") and k != "padding_share"}
            results[dim] = {"data": data[dim], **shown, "runs": runs,
                            "_llm_params": llm_params, "_vision_flops": vision_flops_per_sample}
    peak_after = matmul_peak_gflops()
    # The machine may be shared: the best matmul rate seen in this run is the peak MFU is taken against.
    peak = max([peak_before, peak_after] + [g for r in results.values() for run in r["runs"].values()
                                            for g in run.get("matmul_gflops_before_after", [])])
    for result in results.values():
        llm_params, vision = result.pop("_llm_params"), result.pop("_vision_flops")
        for run in result["runs"].values():
            llm_flops = 6 * llm_params * run["tokens_per_s"]
            run["model_gflops_per_s"] = round(llm_flops / 1e9, 2)
            run["mfu_llm"] = round(llm_flops / (peak * 1e9), 3)
            run["mfu_with_vision"] = round((llm_flops + vision * run["samples_per_s"]) / (peak * 1e9), 3)
    out = {
        "benchmark": "train_throughput",
        "quick": args.quick, "steps": steps, "batch_size": args.batch_size,
        "measured": ("isolated train_stage runs, fastest of rounds kept" if args.isolated else
                     "modes interleaved step by step in one process, one warm-up step each"),
        **({"rounds_fastest_kept": args.rounds} if args.isolated else {}),
        "model_sizes": sizes, "image_size": IMAGE_SIZE, "volume_size": list(VOLUME_SIZE),
        "max_length": MAX_LENGTH,
        "trainable": "finetune defaults: LLM full, connector full, encoder frozen; "
                     "fp32, sdpa, no gradient checkpointing",
        "data_loading": "num_workers 0; 3D volumes read from the filled volume cache",
        "torch_threads": torch.get_num_threads(), "thread_policy": policy.describe(), "cpus": os.cpu_count(),
        "matmul_peak_gflops": {"before": round(peak_before, 1), "after": round(peak_after, 1),
                               "best_seen_used_for_mfu": round(peak, 1)},
        "flops_counted": "6 x all LLM params x real tokens (tied embeddings once, attention scores not counted); "
                         "with_vision adds 2 x encoder params x encoder tokens + 6 x connector params x image tokens",
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "total_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    print(json.dumps(out, indent=2), file=out_stream, flush=True)
    return out


if __name__ == "__main__":
    main(out_stream=results_stream())
