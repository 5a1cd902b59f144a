"""The exception family the CLI turns into a short message and exit code 1.

Every message names what is wrong (file, key path, record) and, in ``hint``, what to do.
"""

from __future__ import annotations


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
