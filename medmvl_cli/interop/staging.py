"""Writing an output folder atomically: built beside its final place, then renamed into it.

A crash or an error half-way leaves the old folder (or nothing) at `out`, never a half-written one.
A non-empty `out` is refused unless `overwrite`, and even then unless medmvl wrote it: it must carry
medmvl's marker (a run folder's `medmvl-run.json`, an export's `medmvl-export.json` manifest) and
hold nothing but what medmvl wrote there, so that a typo cannot delete an unrelated folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medmvl_cli import __version__
from medmvl_cli.errors import MedmvlError, RunError, is_disk_error, write_failure
from medmvl_cli.runs import folder as run_folder

logger = logging.getLogger(__name__)

EXPORT_MANIFEST = "medmvl-export.json"
EXPORT_FORMAT = "medmvl-export"


@dataclass(frozen=True)
class Ownership:
    """How medmvl recognises an output it wrote: `owned(folder)` gives the top-level names it wrote
    there, or None when the folder lacks `marker`."""

    marker: str
    what: str
    owned: Callable[[Path], set[str] | None]


def check_output(out: Path, overwrite: bool, ownership: Ownership, flag: str = "--out") -> None:
    """Refuse a non-empty `out` without `overwrite`, and one that medmvl did not write even with it."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{flag} {out} is a file, not a folder", hint=f"choose another {flag}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise RunError(f"{flag} {out} is not empty", hint=f"pass --overwrite to replace it, or choose another {flag}")
    owned = ownership.owned(out)
    if owned is None:
        raise RunError(
            f"--overwrite refused: {out} is not {ownership.what} medmvl wrote (it has no {ownership.marker})",
            hint=f"choose an empty or new {flag}; medmvl only replaces folders it wrote",
        )
    foreign = sorted(p.name for p in out.iterdir() if p.name not in owned)
    if foreign:
        raise RunError(
            f"--overwrite refused: {out} also holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
            f"medmvl did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})",
            hint=f"move them out of {out}, or choose another {flag}; medmvl replaces the folder as a whole",
        )


@contextmanager
def staged_folder(out: Path, overwrite: bool, ownership: Ownership, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out` in one rename.
    A failure to write (disk full, read-only, missing parent) becomes a RunError naming `out`."""
    out = Path(out).absolute()
    check_output(out, overwrite, ownership, flag)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:
        raise write_failure(out, err, flag) from None
    try:
        yield staging
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, MedmvlError) and is_disk_error(err):
            raise write_failure(out, err, flag) from None
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote %s", out)


def write_export_manifest(folder: Path) -> None:
    """The marker of an export: every file written into `folder` (the last thing written there)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    manifest = {"format": EXPORT_FORMAT, "version": 1, "medmvl": __version__, "files": files}
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def export_entries(folder: Path) -> set[str] | None:
    """The top-level names an export wrote into `folder` (from its manifest), or None without one."""
    try:
        manifest = json.loads((folder / EXPORT_MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"] if manifest.get("format") == EXPORT_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(files, list):
        return None
    return {str(f).split("/", 1)[0] for f in files} | {EXPORT_MANIFEST}


EXPORT = Ownership(EXPORT_MANIFEST, "an exported model folder", export_entries)
RUN = Ownership(run_folder.MARKER, "a run folder", run_folder.owned_entries)
