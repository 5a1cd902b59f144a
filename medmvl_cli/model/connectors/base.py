"""What every connector is: a module from encoder tokens (N, T, enc_width) to LLM embeddings
(N, num_tokens, llm_width). Widths and token counts are derived from the encoder and the LLM."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from medmvl_cli.errors import ModelError
from medmvl_cli.model.encoders.base import TokenLayout

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def make_mlp(in_width: int, out_width: int, depth: int, activation: str) -> nn.Sequential:
    """Linear(in -> out), then (activation, Linear(out -> out)) x (depth - 1): LLaVA's `mlp{depth}x_{act}`."""
    if activation not in ACTIVATIONS:
        raise ModelError(f"unknown activation {activation!r}", hint=f"use one of {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = [nn.Linear(in_width, out_width)]
    for _ in range(depth - 1):
        layers += [ACTIVATIONS[activation](), nn.Linear(out_width, out_width)]
    return nn.Sequential(*layers)


class Connector(nn.Module):
    """Base of every connector backend; `spec` is the recipe section as a dict (with `type`)."""

    type: ClassVar[str] = ""

    def __init__(self, spec: dict[str, Any], layout: TokenLayout, in_width: int, out_width: int):
        super().__init__()
        self.spec = dict(spec)
        self.in_width, self.out_width = in_width, out_width
        self.num_tokens: int = layout.num_tokens
