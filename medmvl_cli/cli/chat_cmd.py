"""`medmvl chat`: a multi-turn conversation with a model in the terminal, answers streamed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medmvl_cli.cli.options import MaxPixelsOption, MaxVoxelsOption, limit_options
from medmvl_cli.constants import IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER

GEN = "Generation"
QUIT = ("/exit", "/quit", "exit", "quit")


def chat(
    model: Annotated[str | None, typer.Option("--model", help="Run folder or model folder; default $MEDMVL_MODEL, else the newest finished run under ./runs.")] = None,
    image: Annotated[Path | None, typer.Option("--image", exists=True, help="A 2D image to talk about (PNG, JPEG, BMP, TIFF, DICOM).")] = None,
    volume: Annotated[Path | None, typer.Option("--volume", exists=True, help="A 3D volume to talk about (.npy, NIfTI, NRRD, MHA, DICOM folder).")] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system prompt (default: the template's own).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer.", rich_help_panel=GEN)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy; > 0 samples.", rich_help_panel=GEN)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0).", rich_help_panel=GEN)] = 1.0,
    max_voxels: MaxVoxelsOption = None,
    max_pixels: MaxPixelsOption = None,
) -> None:
    """Talk with a model about one image or volume (or none), turn after turn.

    Each answer streams as it is generated; the whole conversation is the context of the next
    question. /exit, /quit or Ctrl+D ends it, /reset starts over. The image or volume is read
    and encoded once.

    Examples:
      medmvl chat --model runs/quickstart-3d --volume ct.nii.gz
      medmvl chat --image film.png --temperature 0.7
    """
    if image is not None and volume is not None:
        raise typer.BadParameter("give --image or --volume, not both", param_hint="--volume")
    from rich.console import Console

    from medmvl_cli.inference.generate import GenerationSettings, Request
    from medmvl_cli.runs.resolve import choose_model
    from medmvl_cli.serve.server import load_predictor

    console, err = Console(highlight=False), Console(stderr=True, highlight=False)
    model_dir, how = choose_model(model)
    err.print(f"model: {model_dir} ({how})", soft_wrap=True)
    predictor = load_predictor(model_dir, **limit_options(max_voxels, max_pixels))
    settings = GenerationSettings(max_new_tokens, temperature, top_p)
    media = {"images": [image] if image else [], "volumes": [volume] if volume else []}
    placeholder = f"{IMAGE_PLACEHOLDER}\n" if image else f"{VOLUME_PLACEHOLDER}\n" if volume else ""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    err.print("Ask a question (/exit to leave, /reset to start over).")
    while True:
        try:
            question = console.input("[bold cyan]you>[/bold cyan] ").strip()
        except EOFError:
            console.print()
            return
        if question.lower() in QUIT:
            return
        if question.lower() == "/reset":
            messages = list(start)
            continue
        if not question:
            continue
        first = not any(m["role"] == "user" for m in messages)
        messages.append({"role": "user", "content": (placeholder if first else "") + question})
        console.print("[bold green]model>[/bold green] ", end="")
        answer = predictor.stream(Request(messages=messages, **media), settings,
                                  on_text=lambda piece: console.print(piece, end="", markup=False, soft_wrap=True))
        console.print()
        messages.append({"role": "assistant", "content": answer})
