"""Connectors: structure, derived widths and token counts, pooling semantics, and every
encoder x connector combination on the built-in presets."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from medmvl_cli.config.schema import ClipEncoder, SiglipEncoder, SlicesEncoder, Vit3dEncoder, VolumeConfig
from medmvl_cli.errors import ModelError
from medmvl_cli.model.connectors import CONNECTORS, build_connector
from medmvl_cli.model.encoders import encoder_from_recipe
from medmvl_cli.model.encoders.base import TokenLayout


def test_registry():
    assert set(CONNECTORS) == {"mlp", "spatial_pooling", "attention_pooling"}


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_is_llava_projector(depth):
    head = build_connector({"type": "mlp", "depth": depth, "activation": "relu"}, TokenLayout((4, 4), 1), 32, 48)
    layers = list(head.mlp)
    assert len(layers) == 2 * depth - 1
    assert (layers[0].in_features, layers[0].out_features) == (32, 48)
    assert all(isinstance(m, nn.ReLU) for m in layers[1::2])
    assert all((m.in_features, m.out_features) == (48, 48) for m in layers[2::2])
    assert head.num_tokens == 17
    assert head(torch.randn(2, 17, 32)).shape == (2, 17, 48)


def test_spatial_pooling_averages_grid_cells_and_drops_cls():
    layout = TokenLayout((4, 4, 6), 1)
    head = build_connector({"type": "spatial_pooling", "pool": [2, 2, 3], "depth": 1}, layout, 8, 8)
    assert head.num_tokens == 2 * 2 * 2
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.eye(8))
        head.mlp[0].bias.zero_()
    x = torch.randn(2, 1 + 96, 8)
    out = head(x)
    cube = x[:, 1:].reshape(2, 4, 4, 6, 8)
    # Output token (1, 0, 1) = mean of patches d in 2..3, h in 0..1, w in 3..5.
    expected = cube[:, 2:4, 0:2, 3:6].mean(dim=(1, 2, 3))
    assert torch.allclose(out[:, 1 * 4 + 0 * 2 + 1], expected, atol=1e-6)
    x2 = x.clone()
    x2[:, 0] = 100.0  # the CLS token does not reach the output
    assert torch.allclose(head(x2), out)


@pytest.mark.parametrize("grid, pool", [((4, 6, 6), (2, 3, 2)), ((5, 7, 4), (2, 2, 2)), ((6, 6), (2, 4))])
def test_spatial_pooling_equals_torch_avg_pool(grid, pool):
    head = build_connector({"type": "spatial_pooling", "pool": list(pool), "depth": 1}, TokenLayout(grid), 8, 8)
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.eye(8))
        head.mlp[0].bias.zero_()
    x = torch.randn(3, math.prod(grid), 8)
    cube = x.transpose(1, 2).reshape(3, 8, *grid)
    avg_pool = nn.functional.avg_pool3d if len(grid) == 3 else nn.functional.avg_pool2d
    expected = avg_pool(cube, kernel_size=pool, stride=pool).flatten(2).transpose(1, 2)
    assert head.num_tokens == expected.shape[1]
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_spatial_pooling_on_slices_drops_one_cls_per_slice():
    layout = TokenLayout((2, 2, 2), 2)  # 2 slices, each [CLS, 4 patches]
    head = build_connector({"type": "spatial_pooling", "pool": [1, 2, 2], "depth": 1}, layout, 4, 4)
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.eye(4))
        head.mlp[0].bias.zero_()
    x = torch.randn(1, 10, 4)
    out = head(x)
    assert out.shape == (1, 2, 4)
    assert torch.allclose(out[0, 0], x[0, 1:5].mean(0), atol=1e-6)
    assert torch.allclose(out[0, 1], x[0, 6:10].mean(0), atol=1e-6)


def test_spatial_pooling_2d_grid_and_pool_errors(caplog):
    head = build_connector({"type": "spatial_pooling", "pool": 2}, TokenLayout((4, 4)), 8, 16)
    assert head.num_tokens == 4 and head(torch.randn(1, 16, 8)).shape == (1, 4, 16)
    with pytest.raises(ModelError, match="has 3 axes but the encoder's patch grid"):
        build_connector({"type": "spatial_pooling", "pool": [1, 2, 2]}, TokenLayout((4, 4)), 8, 16)
    with pytest.raises(ModelError, match="larger than the patch grid"):
        build_connector({"type": "spatial_pooling", "pool": 8}, TokenLayout((4, 4)), 8, 16)
    with caplog.at_level(logging.WARNING):
        odd = build_connector({"type": "spatial_pooling", "pool": 2}, TokenLayout((5, 5)), 8, 16)
    assert odd.num_tokens == 4 and "not a multiple of pool" in caplog.text


def test_attention_pooling_queries_default_to_patches_per_slice():
    head = build_connector({"type": "attention_pooling", "heads": 4}, TokenLayout((2, 4, 4), 1), 32, 48)
    assert head.num_tokens == 16 and head.query.shape == (16, 32)
    assert head(torch.randn(3, 33, 32)).shape == (3, 16, 48)
    explicit = build_connector({"type": "attention_pooling", "num_queries": 5, "heads": 8}, TokenLayout((2, 4, 4)), 32, 48)
    assert explicit.num_tokens == 5
    with pytest.raises(ModelError, match="heads 3 does not divide the encoder width 32"):
        build_connector({"type": "attention_pooling", "heads": 3}, TokenLayout((4, 4)), 32, 48)


VOLUME = VolumeConfig(size=(8, 32, 32))
ENCODERS = {
    "clip": (ClipEncoder(type="clip", preset="tiny"), None),
    "clip-cls": (ClipEncoder(type="clip", preset="tiny", select_feature="cls_patch"), None),
    "siglip": (SiglipEncoder(type="siglip", preset="tiny"), None),
    "vit3d": (Vit3dEncoder(type="vit3d", preset="tiny"), VOLUME),
    "vit3d-cls": (Vit3dEncoder(type="vit3d", preset="tiny", select_feature="cls_patch"), VOLUME),
    "slices-clip-cls": (SlicesEncoder(type="slices", base="clip", preset="tiny", num_slices=8, select_feature="cls_patch"), VOLUME),
    "slices-siglip": (SlicesEncoder(type="slices", base="siglip", preset="tiny", num_slices=8), VOLUME),
}
# (encoder tokens, spatial_pooling pool=2 tokens, attention_pooling default tokens)
EXPECTED = {
    "clip": (16, 4, 16), "clip-cls": (17, 4, 16), "siglip": (16, 4, 16),
    "vit3d": (32, 4, 16), "vit3d-cls": (33, 4, 16),
    "slices-clip-cls": (8 * 17, 16, 16), "slices-siglip": (8 * 16, 16, 16),
}


@pytest.fixture(scope="module")
def encoders():
    return {name: encoder_from_recipe(cfg, volume=vol).eval() for name, (cfg, vol) in ENCODERS.items()}


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("index, spec", [
    (0, {"type": "mlp"}), (1, {"type": "spatial_pooling", "pool": 2}), (2, {"type": "attention_pooling", "heads": 4}),
])
def test_every_encoder_with_every_connector(encoders, name, index, spec):
    encoder = encoders[name]
    assert encoder.num_tokens == EXPECTED[name][0]
    head = build_connector(spec, encoder.layout, encoder.width, 96)
    assert head.num_tokens == EXPECTED[name][index]
    inputs = torch.rand(2, 1, 8, 32, 32) if encoder.modality == "volume" else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = head(encoder(inputs))
    assert out.shape == (2, head.num_tokens, 96)
