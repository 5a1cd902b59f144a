"""`mlp`: a per-token MLP (LLaVA's projector). One LLM token per encoder token, CLS included."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from medmvl_cli.model.connectors.base import Connector, make_mlp
from medmvl_cli.model.encoders.base import TokenLayout


class MlpConnector(Connector):
    type: ClassVar[str] = "mlp"

    def __init__(self, spec: dict[str, Any], layout: TokenLayout, in_width: int, out_width: int):
        super().__init__(spec, layout, in_width, out_width)
        self.mlp = make_mlp(in_width, out_width, spec.get("depth", 2), spec.get("activation", "gelu"))
        self.num_tokens = layout.num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, in_width) -> (N, T, out_width)."""
        return self.mlp(x)
