"""Writing an output folder atomically: built beside its final place, then renamed into it.

A crash or an error half-way leaves the old folder (or nothing) at `out`, never a half-written one.
A non-empty `out` is refused unless `overwrite`, and even then only when it looks like something
medmvl writes (`looks_ours`), so that a typo cannot delete an unrelated folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from medmvl_cli.errors import RunError

logger = logging.getLogger(__name__)


def check_output(out: Path, overwrite: bool, looks_ours: Callable[[Path], bool], what: str, flag: str = "--out") -> None:
    """Refuse a non-empty `out` without `overwrite`, and one that is not ours even with it."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{flag} {out} is a file, not a folder", hint=f"choose another {flag}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise RunError(f"{flag} {out} is not empty", hint=f"pass --overwrite to replace it, or choose another {flag}")
    if not looks_ours(out):
        raise RunError(
            f"--overwrite refused: {out} does not look like {what}",
            hint=f"choose an empty {flag}; medmvl only replaces folders it wrote",
        )


@contextmanager
def staged_folder(out: Path, overwrite: bool, looks_ours: Callable[[Path], bool], what: str,
                  flag: str = "--out") -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out` in one rename."""
    out = Path(out).absolute()
    check_output(out, overwrite, looks_ours, what, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = out.parent / f".{out.name}.tmp-{token}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{token}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote %s", out)


def looks_like_model_folder(path: Path) -> bool:
    """A folder an export wrote: config.json of a medmvl or LLaVA model."""
    import json

    config = path / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") in ("medmvl", "llava")
    except (OSError, ValueError):
        return False
