"""`medmvl demo`: a local web page to look at an image or a CT volume and ask a model about it."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from medmvl_cli.cli.options import MaxPixelsOption, MaxVoxelsOption

logger = logging.getLogger(__name__)
SERVER = "Server"


def demo(
    model: Annotated[str | None, typer.Option("--model", help="Run folder or model folder; default $MEDMVL_MODEL, else the newest finished run under ./runs.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens the page to the network (no login).", rich_help_panel=SERVER)] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.", rich_help_panel=SERVER)] = 7860,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=1, help="Largest file a user may upload, in MB.", rich_help_panel=SERVER)] = 1024,
    share: Annotated[bool, typer.Option("--share", help="Also publish a public gradio.live link (needs internet; anyone with the link can use the model).", rich_help_panel=SERVER)] = False,
    max_voxels: MaxVoxelsOption = None,
    max_pixels: MaxPixelsOption = None,
) -> None:
    """Start a web page to view a 2D image or a 3D volume and chat with a model about it.

    The model is loaded once and answers one question at a time; other users wait in a queue.
    The page's address is printed on stdout; Ctrl+C stops the server.
    Needs gradio, the `demo` extra of the package (see docs/demo.md).

    Examples:
      medmvl demo --model runs/quickstart-3d
      medmvl demo --model runs/ct-qwen-finetune --port 8080 --max-upload-mb 2048
    """
    from rich.console import Console

    from medmvl_cli.cli.options import limit_options
    from medmvl_cli.demo.app import launch, require_gradio
    from medmvl_cli.inference.generate import Predictor
    from medmvl_cli.runs.resolve import resolve_model_dir
    from medmvl_cli.serve.server import is_loopback

    require_gradio()  # before the minutes a large model takes to load
    err = Console(stderr=True)
    model_dir = resolve_model_dir(model)
    err.print(f"model: {model_dir}")
    if not is_loopback(host):
        logger.warning("listening on %s: anyone who can reach this machine can use the model (the page has no login)", host)
    if share:
        logger.warning("--share: the page is published on a public gradio.live address")
    limits = limit_options(max_voxels, max_pixels)
    predictor = Predictor(model_dir, **limits)

    def ready(local_url: str, share_url: str | None) -> None:
        typer.echo(local_url.rstrip("/") + "/", nl=True)
        if share_url:
            typer.echo(share_url)
        err.print(f"medmvl demo is running: open {local_url} in a browser (Ctrl+C stops it).")

    launch(predictor, host=host, port=port, max_upload_mb=max_upload_mb, share=share, on_ready=ready, **limits)

