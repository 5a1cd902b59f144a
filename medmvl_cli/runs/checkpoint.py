"""Checkpoint integrity: checksums written inside each checkpoint, verified before a resume.

Every checkpoint medmvl saves gets `medmvl-checksums.json` (size and SHA-256 of each file in it),
written before the folder is renamed to `step-N`. A resume reads nothing of a checkpoint that fails
the check: not a file missing, changed, truncated or added, nor a checkpoint without checksums
(an older medmvl's, or another tool's). That matters beyond torn files: DeepSpeed's loader
unpickles its `global_step*` files, so only bytes medmvl wrote, in a folder it marked, may reach it.

`--resume auto` takes the newest intact checkpoint and warns about newer damaged ones;
`--resume PATH` takes PATH only if it is intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from medmvl_cli.errors import RunError

logger = logging.getLogger(__name__)

CHECKSUMS = "medmvl-checksums.json"
CHECKSUMS_FORMAT = "medmvl-checkpoint"
_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(folder: Path) -> None:
    """Record size and SHA-256 of every file in `folder` (before it is renamed into place)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(folder)}
    tmp = folder / f".{CHECKSUMS}.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump({"format": CHECKSUMS_FORMAT, "version": 1, "algorithm": "sha256", "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / CHECKSUMS)


def damage(folder: Path) -> str | None:
    """Why `folder` is not an intact medmvl checkpoint (naming the file), or None when it is."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))
        files = recorded["files"] if recorded.get("format") == CHECKSUMS_FORMAT else None
    except FileNotFoundError:
        return f"{folder / CHECKSUMS} is missing (not saved by this medmvl)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{folder / CHECKSUMS} is unreadable"
    if not isinstance(files, dict):
        return f"{folder / CHECKSUMS} is not a medmvl checksum file"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected.get("size"):
            return f"{path} has {path.stat().st_size} bytes, {expected.get('size')} were written"
        if _sha256(path) != expected.get("sha256"):
            return f"{path} does not match its checksum (changed or corrupt)"
    added = [p for p in _files(folder) if p.relative_to(folder).as_posix() not in files]
    if added:
        return f"{added[0]} was not written by medmvl"
    return None


def choose_checkpoint(checkpoints: list[Path]) -> Path | None:
    """--resume auto: the newest intact checkpoint of `checkpoints` (oldest first); None if there are none."""
    damaged = []
    for checkpoint in reversed(checkpoints):
        reason = damage(checkpoint)
        if reason is None:
            if damaged:
                logger.warning("skipping damaged checkpoint%s %s; resuming from %s",
                               "s" if len(damaged) > 1 else "", "; ".join(damaged), checkpoint)
            return checkpoint
        damaged.append(f"{checkpoint.name} ({reason})")
    if damaged:
        raise RunError(f"no intact checkpoint to resume from: {'; '.join(damaged)}",
                       hint="start over with --overwrite, or restore the checkpoint files from a backup")
    return None


def verify_requested(checkpoint: Path, own_checkpoints: Path) -> Path:
    """--resume PATH: PATH must be an intact checkpoint in a run folder medmvl made."""
    from medmvl_cli.runs.folder import RunFolder, has_marker

    if not checkpoint.is_dir():
        raise RunError(f"--resume {checkpoint}: no such checkpoint folder",
                       hint=f"use --resume auto, or one of {own_checkpoints}/step-N")
    run = checkpoint.parent.parent
    if not has_marker(run):
        raise RunError(f"--resume {checkpoint}: not a checkpoint of a run folder medmvl made",
                       hint="resume only from runs/NAME/checkpoints/step-N of a medmvl run")
    reason = damage(checkpoint)
    if reason is not None:
        intact = next((c for c in reversed(RunFolder(run).checkpoints()) if c != checkpoint and damage(c) is None), None)
        raise RunError(f"--resume {checkpoint}: the checkpoint is damaged: {reason}",
                       hint=f"resume from an intact one ({intact})" if intact else
                       "start over with --overwrite, or restore the checkpoint files from a backup")
    return checkpoint
