"""Loading the model for `medmvl serve` / `medmvl chat`, checking where it may bind, running uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medmvl_cli.config.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS
from medmvl_cli.errors import RunError

logger = logging.getLogger(__name__)

API_KEY_ENV = "MEDMVL_API_KEY"


def require_serve_extra() -> None:
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise RunError(f"medmvl serve needs {' and '.join(missing)}, which are not installed",
                       hint='pip install -e ".[serve]"  (or: pip install fastapi uvicorn)')


def load_predictor(model_dir: Path, feature_cache_size: int = 64, max_voxels: int = DEFAULT_MAX_VOXELS,
                   max_pixels: int = DEFAULT_MAX_PIXELS):
    """The predictor `serve` and `chat` answer with: the model, its template and the same readers
    and preprocessing as `medmvl infer`, with the same header limits (`--max-voxels`, `--max-pixels`)."""
    from medmvl_cli.inference.generate import Predictor

    return Predictor(model_dir, feature_cache_size=feature_cache_size, max_voxels=max_voxels, max_pixels=max_pixels)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, api_key: str | None) -> None:
    """Anything but loopback needs an API key: the model reads patient images."""
    if not is_loopback(host) and not api_key:
        raise RunError(f"--host {host} would accept connections from other machines without an API key",
                         hint=f"set --api-key KEY (or ${API_KEY_ENV}), or keep the default --host 127.0.0.1")


def run(predictor, settings, host: str, port: int) -> None:
    """Serve until SIGINT / SIGTERM: uvicorn then stops accepting connections, lets the requests in
    flight finish (up to the request timeout), stops the batcher and exits."""
    import uvicorn

    from medmvl_cli.serve.app import create_app

    check_binding(host, settings.api_key)
    config = uvicorn.Config(create_app(predictor, settings), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=int(settings.request_timeout_s) + 1)
    uvicorn.Server(config).run()


@contextmanager
def serve_in_thread(predictor, settings, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the server in a background thread (tests, benchmarks, notebooks); yields its base URL
    (``http://HOST:PORT/v1``). Port 0 takes a free one."""
    import socket
    import threading
    import time

    import uvicorn

    from medmvl_cli.serve.app import create_app

    check_binding(host, settings.api_key)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(create_app(predictor, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="medmvl-serve", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RunError("the server thread stopped while starting", hint="run with --debug to see why")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
