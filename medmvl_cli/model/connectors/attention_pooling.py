"""`attention_pooling`: learned queries attend over all encoder tokens, then an MLP (MedM-VL).

`num_queries` learned queries (null = the patches of one slice of the grid: gh·gw, MedM-VL's
choice, e.g. 256 for a 16x16 grid) go through one `nn.MultiheadAttention` (embed width = the
encoder's, `heads` heads; MedM-VL uses 8) with the encoder tokens, CLS included, as keys and values.
Tokens out: num_queries.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from medmvl_cli.errors import ModelError
from medmvl_cli.model.connectors.base import Connector, make_mlp
from medmvl_cli.model.encoders.base import TokenLayout


class AttentionPoolingConnector(Connector):
    type: ClassVar[str] = "attention_pooling"

    def __init__(self, spec: dict[str, Any], layout: TokenLayout, in_width: int, out_width: int):
        super().__init__(spec, layout, in_width, out_width)
        heads = int(spec.get("heads", 8))
        if in_width % heads:
            raise ModelError(
                f"attention_pooling connector: heads {heads} does not divide the encoder width {in_width}",
                hint="choose `heads` so that the encoder width is a multiple of it",
            )
        self.num_tokens = int(spec.get("num_queries") or layout.patches_per_slice)
        self.query = nn.Parameter(torch.empty(self.num_tokens, in_width))
        nn.init.normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(embed_dim=in_width, num_heads=heads, batch_first=True)
        self.mlp = make_mlp(in_width, out_width, spec.get("depth", 2), spec.get("activation", "gelu"))

    def init_own_weights(self, std: float) -> None:
        """The learned queries N(0, std); called by `MedmvlPreTrainedModel._init_weights`."""
        from transformers import initialization as init

        init.normal_(self.query, mean=0.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, in_width) -> (N, num_queries, out_width)."""
        queries = self.query.unsqueeze(0).expand(x.shape[0], -1, -1)
        pooled, _ = self.attn(queries, x, x, need_weights=False)
        return self.mlp(pooled)
