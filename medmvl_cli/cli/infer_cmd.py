"""`medmvl infer`: ask a model about one image / volume, or answer a whole annotation file."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from medmvl_cli.cli.options import MaxPixelsOption, MaxVoxelsOption
from medmvl_cli.constants import IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER

GEN = "Generation"
BATCH = "Batch (--data)"
DEFAULT_PROMPTS = {
    "image": f"{IMAGE_PLACEHOLDER}\nDescribe the findings in this image.",
    "image3d": f"{VOLUME_PLACEHOLDER}\nWrite the findings of a radiology report for this CT scan.",
}


def infer(
    model: Annotated[str | None, typer.Option("--model", help="Run folder or model folder; default $MEDMVL_MODEL, else the newest finished run under ./runs.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="A 2D image (PNG, JPEG, BMP, TIFF, DICOM).")] = None,
    volume: Annotated[Path | None, typer.Option("--volume", help="A 3D volume (.npy, NIfTI, NRRD, MHA, DICOM folder).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="The question (default: a description for an image, a report for a volume); the placeholder is added when missing.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Annotation file to answer (batch mode).", rich_help_panel=BATCH)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Predictions JSONL (batch mode).", rich_help_panel=BATCH)] = None,
    image_root: Annotated[Path | None, typer.Option("--image-root", help="Folder image paths are relative to (default: the annotation file's).", rich_help_panel=BATCH)] = None,
    volume_root: Annotated[Path | None, typer.Option("--volume-root", help="Folder volume paths are relative to (default: the annotation file's).", rich_help_panel=BATCH)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Questions per batch.", rich_help_panel=BATCH)] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the output file over instead of resuming.", rich_help_panel=BATCH)] = False,
    feature_cache: Annotated[bool, typer.Option("--feature-cache/--no-feature-cache", help="Reuse a volume's features across its questions.", rich_help_panel=BATCH)] = True,
    prefix_cache: Annotated[bool, typer.Option("--prefix-cache/--no-prefix-cache", help="Prefill the prompt prefix a volume's questions share once per batch (same answers, faster).", rich_help_panel=BATCH)] = True,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer.", rich_help_panel=GEN)] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy; > 0 samples.", rich_help_panel=GEN)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0).", rich_help_panel=GEN)] = 1.0,
    num_beams: Annotated[int, typer.Option("--num-beams", min=1, help="Beam search width.", rich_help_panel=GEN)] = 1,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling, to draw the same answers again.", rich_help_panel=GEN)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    max_voxels: MaxVoxelsOption = None,
    max_pixels: MaxPixelsOption = None,
) -> None:
    """Answer a question about one image or volume, or every record of an annotation file.

    One question: the answer streams to stdout; the model used goes to stderr.
    A file: one JSON row per record in --out, written as each batch finishes.
    Running the same command again resumes: ids already in --out are skipped.
    See docs/inference.md.

    Examples:
      medmvl infer --volume ct.nii.gz --prompt "Is there a nodule?"
      medmvl infer --image film.png --temperature 0.7 --seed 1
      medmvl infer --model runs/quickstart-2d --data test_2d.json --out preds.jsonl
    """
    single = image is not None or volume is not None
    if single == (data is not None):
        raise typer.BadParameter("give --image and / or --volume (one question), or --data with --out (a file)")
    if data is not None and out is None:
        raise typer.BadParameter("--data needs --out PREDICTIONS.jsonl", param_hint="--out")
    if data is not None and prompt is not None:
        raise typer.BadParameter("--prompt is for --image / --volume; with --data the records hold the questions",
                                 param_hint="--prompt")
    from rich.console import Console

    from medmvl_cli.cli.options import limit_options
    from medmvl_cli.inference.generate import GenerationSettings, Predictor, Request
    from medmvl_cli.runs.resolve import choose_model

    err = Console(stderr=True)
    model_dir, how = choose_model(model)
    err.print(f"model: {model_dir} ({how})", highlight=False, soft_wrap=True)
    predictor = Predictor(model_dir, **limit_options(max_voxels, max_pixels))
    settings = GenerationSettings(max_new_tokens, temperature, top_p, num_beams)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    if single:
        text = prompt or DEFAULT_PROMPTS["image3d" if volume is not None else "image"]
        for path, placeholder in ((volume, VOLUME_PLACEHOLDER), (image, IMAGE_PLACEHOLDER)):
            if path is not None and placeholder not in text:
                text = f"{placeholder}\n{text}"
        request = Request(messages=[{"role": "user", "content": text}],
                          images=[image] if image else [], volumes=[volume] if volume else [])
        predictor.stream(request, settings, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
    _batch(predictor, data, out, settings, image_root, volume_root, batch_size, overwrite, feature_cache, prefix_cache,
           quiet, err)


def _batch(predictor, data, out, settings, image_root, volume_root, batch_size, overwrite, feature_cache, prefix_cache,
           quiet, err):
    from medmvl_cli.inference.predictions import predict_file
    from medmvl_cli.progress import JobProgress

    start = time.perf_counter()
    with JobProgress("infer", err, enabled=not quiet) as progress:
        counts = predict_file(predictor, data, out, settings, image_root=image_root, volume_root=volume_root,
                              batch_size=batch_size, overwrite=overwrite, use_feature_cache=feature_cache,
                              reuse_prefix=prefix_cache, on_progress=progress.update)
    elapsed = time.perf_counter() - start
    err.print(f"{counts['asked']} asked ({counts['asked'] / max(elapsed, 1e-9):.2f} items/s), "
              f"{counts['skipped']} already in {out}, {counts['errors']} error(s)", highlight=False, soft_wrap=True)
    typer.echo(str(out))
