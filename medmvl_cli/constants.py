"""Values the data side and the model must agree on, written once.

A leaf module (no imports from the package): every floor may use it.
"""

from __future__ import annotations

from pathlib import Path

# Labels that take no part in the loss (PyTorch's cross-entropy default `ignore_index`).
IGNORE_INDEX = -100

# The placeholders a conversation marks its media with; each becomes one special token that the
# data side expands to the branch's token count and the model overwrites with features.
IMAGE_PLACEHOLDER = "<image>"
VOLUME_PLACEHOLDER = "<image3d>"
PLACEHOLDERS: tuple[str, ...] = (IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER)
# The placeholder of each model branch (the recipe's `model.image` / `model.image3d`).
BRANCH_PLACEHOLDERS = {"image": IMAGE_PLACEHOLDER, "image3d": VOLUME_PLACEHOLDER}

# The recipes that ship inside the package (quickstart, DeepSpeed presets, the paper's recipes).
# In a clone this is a link to the repository's `recipes/`, so documented paths stay as they are;
# a wheel holds the files themselves.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
