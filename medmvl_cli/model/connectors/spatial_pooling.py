"""`spatial_pooling`: average pooling over the encoder's patch grid, then an MLP (M3D / MedM-VL).

The grid, (gd, gh, gw) for 3D encoders and slices or (gh, gw) for 2D ones, comes from the encoder.
CLS tokens are dropped before pooling (they have no place on the grid). Kernel = stride = `pool`;
like `avg_pool3d`, a trailing remainder of an axis not divisible by `pool` is dropped (a warning
says so). Tokens out: prod(g // p) over the axes.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import torch

from medmvl_cli.errors import ModelError
from medmvl_cli.model.connectors.base import Connector, make_mlp
from medmvl_cli.model.encoders.base import TokenLayout

logger = logging.getLogger(__name__)


def pool_sizes(pool: Any, grid: tuple[int, ...]) -> tuple[int, ...]:
    """The recipe's `pool` (one int, or one per axis) matched to the grid's axes."""
    sizes = (int(pool),) * len(grid) if isinstance(pool, int) else tuple(int(p) for p in pool)
    if len(sizes) != len(grid):
        raise ModelError(
            f"spatial_pooling connector: pool {list(sizes)} has {len(sizes)} axes but the encoder's patch grid "
            f"{list(grid)} has {len(grid)}",
            hint=f"give one int, or {len(grid)} values",
        )
    too_big = [f"{p} > {g}" for p, g in zip(sizes, grid) if p > g]
    if too_big:
        raise ModelError(
            f"spatial_pooling connector: pool {list(sizes)} is larger than the patch grid {list(grid)} ({', '.join(too_big)})",
            hint="use a smaller `pool`",
        )
    return sizes


class SpatialPoolingConnector(Connector):
    type: ClassVar[str] = "spatial_pooling"

    def __init__(self, spec: dict[str, Any], layout: TokenLayout, in_width: int, out_width: int):
        super().__init__(spec, layout, in_width, out_width)
        self.layout = layout
        self.pool = pool_sizes(spec.get("pool", 2), layout.grid)
        if any(g % p for g, p in zip(layout.grid, self.pool)):
            logger.warning(
                "spatial_pooling: grid %s is not a multiple of pool %s; the trailing patches of an axis are dropped",
                list(layout.grid), list(self.pool),
            )
        self.pooled_grid = tuple(g // p for g, p in zip(layout.grid, self.pool))
        self.num_tokens = math.prod(self.pooled_grid)
        self.mlp = make_mlp(in_width, out_width, spec.get("depth", 2), spec.get("activation", "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, in_width) -> (N, prod(grid // pool), out_width)."""
        x = self.layout.drop_cls(x)
        n, _, c = x.shape
        # Average pooling as a reshape + mean, channels last: the same numbers as avg_pool3d /
        # avg_pool2d (kernel = stride, remainder dropped) in any dtype (CPU has no bf16 avg_pool3d).
        cube = x.reshape(n, *self.layout.grid, c)
        cube = cube[(slice(None),) + tuple(slice(0, g * p) for g, p in zip(self.pooled_grid, self.pool))]
        split = [n]
        for g, p in zip(self.pooled_grid, self.pool):
            split += [g, p]
        pooled = cube.reshape(*split, c).mean(dim=tuple(range(2, 2 * len(self.pool) + 1, 2)))
        return self.mlp(pooled.reshape(n, -1, c))
