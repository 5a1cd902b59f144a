"""Connector registry: one backend per file, chosen by the recipe's `type`.

| type              | tokens out                         | widths                         |
|-------------------|------------------------------------|--------------------------------|
| mlp               | the encoder's (CLS included)       | encoder width -> LLM width     |
| spatial_pooling   | prod(grid // pool), CLS dropped    | encoder width -> LLM width     |
| attention_pooling | num_queries (default gh·gw)        | encoder width -> LLM width     |
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


def build_connector(spec: dict[str, Any], layout: TokenLayout, in_width: int, out_width: int) -> Connector:
    """The connector `spec` (a recipe section as a dict) names, sized from the encoder and the LLM."""
    kind = spec.get("type")
    if kind not in CONNECTORS:
        raise ModelError(f"unknown connector type {kind!r}", hint=f"known types: {', '.join(CONNECTORS)}")
    return CONNECTORS[kind](spec, layout, in_width, out_width)


__all__ = ["CONNECTORS", "Connector", "build_connector", "make_mlp"]
