"""Connector registry: one backend per file, chosen by the recipe's `type`.

| type              | tokens out                         | widths                         |
|-------------------|------------------------------------|--------------------------------|
| mlp               | the encoder's (CLS included)       | encoder width -> LLM width     |
| spatial_pooling   | prod(grid // pool), CLS dropped    | encoder width -> LLM width     |
| attention_pooling | num_queries (default gh·gw)        | encoder width -> LLM width     |

`slice_mean: true` (any type; a (slices, gh, gw) grid, as the `slices` encoder gives): the
connector runs on each slice's tokens alone and its outputs are averaged over the slices, as
MedM-VL's code did before its weights' release day (135db87; `medmvl import medm-vl
--slice-pooling mean`). Tokens out: those of one slice.
"""

from __future__ import annotations

from typing import Any

from medmvl_cli.errors import ModelError
from medmvl_cli.model.connectors.attention_pooling import AttentionPoolingConnector
from medmvl_cli.model.connectors.base import Connector, make_mlp
from medmvl_cli.model.connectors.mlp import MlpConnector
from medmvl_cli.model.connectors.spatial_pooling import SpatialPoolingConnector
from medmvl_cli.model.encoders.base import TokenLayout

CONNECTORS: dict[str, type[Connector]] = {
    cls.type: cls for cls in (MlpConnector, SpatialPoolingConnector, AttentionPoolingConnector)
}


class _SliceMean:
    """Mixin over a connector class: run it on each slice's tokens, average the outputs over slices."""

    num_slices: int

    def forward(self, x):
        """(N, S·T, in_width) -> (N, num_tokens, out_width): the mean over the S slices."""
        n, _, c = x.shape
        out = super().forward(x.reshape(n * self.num_slices, -1, c))
        return out.reshape(n, self.num_slices, *out.shape[1:]).mean(dim=1)


# The same parameter names as the plain classes, so weights load either way.
_SLICE_MEAN = {kind: type(f"SliceMean{cls.__name__}", (_SliceMean, cls), {}) for kind, cls in CONNECTORS.items()}


def build_connector(spec: dict[str, Any], layout: TokenLayout, in_width: int, out_width: int) -> Connector:
    """The connector `spec` (a recipe section as a dict) names, sized from the encoder and the LLM."""
    kind = spec.get("type")
    if kind not in CONNECTORS:
        raise ModelError(f"unknown connector type {kind!r}", hint=f"known types: {', '.join(CONNECTORS)}")
    if not spec.get("slice_mean"):
        return CONNECTORS[kind](spec, layout, in_width, out_width)
    slices = layout.grid[0]
    if len(layout.grid) != 3 or layout.cls_tokens not in (0, slices):
        raise ModelError(
            f"{kind} connector: slice_mean needs the (slices, gh, gw) token grid of a `slices` encoder, "
            f"not grid {list(layout.grid)} with {layout.cls_tokens} CLS token(s)",
            hint="use slice_mean only with model.image3d.encoder.type: slices",
        )
    per_slice = TokenLayout(layout.grid[1:], layout.cls_tokens // slices)
    connector = _SLICE_MEAN[kind](spec, per_slice, in_width, out_width)
    connector.num_slices = slices
    return connector


__all__ = ["CONNECTORS", "Connector", "build_connector", "make_mlp"]
