"""What loading a recipe passes between its steps: the problems found, and the raw YAML tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where (dotted key path), what, and how to fix it."""

    path: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = self.path or "(recipe)"
        return f"{where}: {self.message}" + (f" ({self.hint})" if self.hint else "")


@dataclass
class RawRecipe:
    """The YAML tree after overrides, with where it came from."""

    tree: dict
    source: Path | None
    overridden: set[str]
