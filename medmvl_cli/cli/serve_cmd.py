"""`medmvl serve`: the model behind OpenAI's chat-completions API, with dynamic batching."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medmvl_cli.cli.options import MaxPixelsOption, MaxVoxelsOption, limit_options

SERVER = "Server"
LIMITS = "Batching and limits"


def serve(
    model: Annotated[str | None, typer.Option("--model", help="Run folder or model folder; default $MEDMVL_MODEL, else the newest finished run under ./runs.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback needs --api-key.", rich_help_panel=SERVER)] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.", rich_help_panel=SERVER)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="MEDMVL_API_KEY", show_envvar=True, help="Require Authorization: Bearer KEY on /v1 routes.", rich_help_panel=SERVER)] = None,
    allowed_local_root: Annotated[Path | None, typer.Option("--allowed-local-root", exists=True, file_okay=False, help="Let requests name files under this folder with file:// URLs (off by default).", rich_help_panel=SERVER)] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Most requests answered in one forward.", rich_help_panel=LIMITS)] = 8,
    batch_window_ms: Annotated[float, typer.Option("--batch-window-ms", min=0, help="How long the first request of a batch waits for others.", rich_help_panel=LIMITS)] = 5.0,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=1, help="Largest request body (base64 media included).", rich_help_panel=LIMITS)] = 256,
    request_timeout: Annotated[float, typer.Option("--request-timeout", min=1, help="Seconds a request may take, queueing included.", rich_help_panel=LIMITS)] = 300,
    feature_cache_size: Annotated[int, typer.Option("--feature-cache-size", min=1, help="Volumes whose encoder features are kept (by content hash).", rich_help_panel=LIMITS)] = 64,
    max_voxels: MaxVoxelsOption = None,
    max_pixels: MaxPixelsOption = None,
) -> None:
    """Serve a model with OpenAI's chat-completions API, batching concurrent requests.

    Routes: POST /v1/chat/completions (streaming as server-sent events), GET /v1/models, GET /health.
    Images are image_url parts with data: URLs; volumes are file parts (file_data + filename:
    .nii / .nii.gz, .nrrd, .mha, .npy, or a .zip of one DICOM series). Concurrent requests are
    batched. Listens on 127.0.0.1 unless told otherwise; request contents are never logged.
    Needs FastAPI and uvicorn, the `serve` extra of the package; see docs/serving.md.

    Examples:
      medmvl serve --model runs/quickstart-3d
      MEDMVL_API_KEY=secret medmvl serve --host 0.0.0.0 --port 8000 --max-batch-size 16
    """
    from rich.console import Console

    from medmvl_cli.runs.resolve import choose_model
    from medmvl_cli.serve.server import check_binding, load_predictor, require_serve_extra, run

    require_serve_extra()
    check_binding(host, api_key)  # before the minutes a large model takes to load
    from medmvl_cli.serve.app import ServeSettings

    err = Console(stderr=True)
    model_dir, how = choose_model(model)
    err.print(f"model: {model_dir} ({how})", highlight=False, soft_wrap=True)
    settings = ServeSettings(api_key=api_key, max_batch_size=max_batch_size, batch_window_s=batch_window_ms / 1000,
                             allowed_local_root=allowed_local_root, max_body_bytes=int(max_body_mb * (1 << 20)),
                             request_timeout_s=request_timeout)
    predictor = load_predictor(model_dir, feature_cache_size=feature_cache_size, **limit_options(max_voxels, max_pixels))
    err.print(f"serving {predictor.name} on http://{host}:{port}/v1 (Ctrl+C or SIGTERM stops it)", highlight=False)
    run(predictor, settings, host, port)
