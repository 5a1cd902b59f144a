"""A look at weight files before a library reads them: a truncated or corrupt `.safetensors`
becomes a ModelError naming the file, not a deserialising error from deep inside transformers.
`architecture_only()`: encoders built inside it skip reading their weights (shapes only)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from medmvl_cli.errors import ModelError

_READ_WEIGHTS: ContextVar[bool] = ContextVar("medmvl_read_weights", default=True)


@contextmanager
def architecture_only() -> Iterator[None]:
    """Encoders built inside (on the meta device, say) read their folders' configs but not their
    weights: for what depends on shapes alone, such as the tokens each placeholder expands to."""
    token = _READ_WEIGHTS.set(False)
    try:
        yield
    finally:
        _READ_WEIGHTS.reset(token)


def reads_weights() -> bool:
    """False inside `architecture_only()`."""
    return _READ_WEIGHTS.get()


def check_safetensors(folder: str | Path, what: str, hint: str) -> None:
    """Read the header of every `.safetensors` file in `folder` and its subfolders one level down
    (adapters); safetensors checks there that the file holds every byte its header promises."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # SafetensorError, OSError: either way the file cannot be used
            raise ModelError(f"{what}: {path} is damaged (truncated or corrupt: {err})", hint=hint) from None
