"""What every encoder is: a module from pixels / voxels to a sequence of feature tokens.

An encoder knows its output width, the layout of the tokens it returns (the patch grid and where
CLS tokens sit) and an `arch` dict: a JSON-able description from which the same architecture is
rebuilt with random weights (`from_arch`), so a saved model needs no path back to the encoder's
original folder. `from_recipe` builds it from a recipe section and loads the released weights.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from medmvl_cli.errors import ModelError


@dataclass(frozen=True)
class TokenLayout:
    """How an encoder's selected tokens are laid out.

    ``grid`` is the patch grid, row-major: (gh, gw) for 2D encoders, (gd, gh, gw) for 3D ones and
    (num_slices, gh, gw) for a 2D encoder over slices. ``cls_tokens`` CLS tokens split the sequence
    into equal groups, each group opening with its CLS token: 0 (no CLS), 1 (one CLS at position 0)
    or num_slices (one CLS per slice).
    """

    grid: tuple[int, ...]
    cls_tokens: int = 0

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.cls_tokens

    @property
    def patches_per_slice(self) -> int:
        """Patches of one axial slice of the grid (the whole grid for 2D encoders)."""
        return math.prod(self.grid[-2:])

    def drop_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_tokens, C) -> (B, num_patches, C): the patch tokens only, in grid order."""
        if not self.cls_tokens:
            return x
        b, t, c = x.shape
        groups = x.reshape(b, self.cls_tokens, t // self.cls_tokens, c)
        return groups[:, :, 1:].reshape(b, self.num_patches, c)


def check_select_layer(select_layer: int, num_states: int, what: str) -> int:
    """A hidden-state index (HF style, 0 = embeddings, negative from the end) as a positive index."""
    if not -num_states <= select_layer < num_states:
        raise ModelError(
            f"{what}: select_layer {select_layer} is out of range; this encoder has {num_states} hidden states "
            f"(embeddings + {num_states - 1} layers)",
            hint=f"use an index from {-num_states} to {num_states - 1} (-1 = last layer, -2 = the one before)",
        )
    return select_layer % num_states


class Encoder(nn.Module, ABC):
    """Base of every encoder backend. Subclasses set `type`, `modality`, `width` and `layout`."""

    type: ClassVar[str] = ""
    modality: ClassVar[str] = "image"  # image: (N, 3, H, W) pixel values; volume: (N, 1, D, H, W) in [0, 1]

    def __init__(self, arch: dict[str, Any]):
        super().__init__()
        self.arch = dict(arch)
        self.width: int = 0
        self.layout: TokenLayout = TokenLayout((1,))

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @classmethod
    @abstractmethod
    def from_recipe(cls, cfg: Any, volume: Any | None = None, attn_implementation: str = "sdpa") -> Encoder:
        """Build from a recipe section (`model.<branch>.encoder`) and load its released weights."""
        ...

    @classmethod
    def from_arch(cls, arch: dict[str, Any], attn_implementation: str = "sdpa") -> Encoder:
        """Rebuild the architecture from `arch` with random weights (a saved model loads them after)."""
        return cls(arch, attn_implementation=attn_implementation)

    def describe(self) -> str:
        """One line for logs: backend, tokens, width."""
        cls_part = f" + {self.layout.cls_tokens} CLS" if self.layout.cls_tokens else ""
        grid = "x".join(str(g) for g in self.layout.grid)
        return f"{self.type}: {grid} patches{cls_part} = {self.num_tokens} tokens of width {self.width}"


def mark_loaded(module: nn.Module) -> None:
    """Flag every parameter and submodule as holding loaded weights, so that transformers'
    `post_init` (which initialises whatever is not flagged) leaves them alone."""
    for sub in module.modules():
        sub._is_hf_initialized = True
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor._is_hf_initialized = True
