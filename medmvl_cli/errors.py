"""The exception family the CLI turns into a short message and exit code 1.

Every message names what is wrong (file, key path, record) and, in ``hint``, what to do.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class MedmvlError(Exception):
    """A failure the user can act on. ``hint`` says what to do about it."""

    title = "Error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class RecipeError(MedmvlError):
    """A recipe that does not load or does not validate. ``problems`` lists every one."""

    title = "Recipe error"

    def __init__(self, message: str, hint: str | None = None, problems: list | None = None):
        super().__init__(message, hint)
        self.problems = problems or []


class DataError(MedmvlError):
    """Bad annotation records or unreadable image / volume files."""

    title = "Data error"


class ModelError(MedmvlError):
    """A model that cannot be built, loaded or saved."""

    title = "Model error"


class RunError(MedmvlError):
    """A training, inference or export run that cannot start or failed."""

    title = "Run error"


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space there, or choose a location on another disk",
    errno.EDQUOT: "your disk quota is used up: free space there, or choose another location",
    errno.EROFS: "that location is read-only: choose a writable one",
    errno.EACCES: "you may not write there: choose a folder you own, or fix its permissions",
    errno.EPERM: "you may not write there: choose a folder you own, or fix its permissions",
    errno.ENOENT: "the path, or a folder on the way, does not exist: fix the path or create the folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EEXIST: "a file stands where a folder is needed: fix the path",
}


def _errno_of(err: BaseException) -> int | None:
    """The errno of an OSError, or of the OS error a library wrapped in its own message (torch's
    "file write failed", safetensors' "No space left on device (os error 28)")."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    text = str(err)
    for number in _OS_HINTS:
        if f"os error {number})" in text or os.strerror(number) in text:
            return number
    return None


def os_error_hint(err: OSError) -> str:
    """What to do about an OSError, by its errno."""
    return _OS_HINTS.get(err.errno, "check that the path exists and that you may read (and write) it")


def is_disk_error(err: BaseException) -> bool:
    """An error of the disk rather than of the data: an OSError, or torch / safetensors wrapping one
    (torch reports a short write of its zip container as "inline_container ... unexpected pos")."""
    return isinstance(err, OSError) or _errno_of(err) is not None or "inline_container" in str(err)


def write_failure(path: str | Path, err: BaseException, what: str, then: str | None = None) -> RunError:
    """A RunError for `what` that could not be written at `path`, saying why and what to do."""
    number = _errno_of(err)
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
    hint = _OS_HINTS.get(number, "check that the location exists, is writable and has free space")
    if isinstance(err, OSError) and err.filename and Path(err.filename) != Path(path):
        reason = f"{reason}: {err.filename}"
    return RunError(f"cannot write {what} at {path} ({reason})", hint=hint + (f"; {then}" if then else ""))
