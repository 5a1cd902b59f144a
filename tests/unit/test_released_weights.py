"""Released-weight loading for m3d_clip and medm_clip, by the released key names.

Synthetic checkpoints use the real names and shapes (tiny sizes) of M3D-CLIP
(BAAI-DCAI/M3D `LaMed/src/model/CLIP.py`: MONAI ViT under `vision_encoder.`, BERT under
`language_encoder.`) and MedM-CLIP (MSIIP/MedM-VL `lvlm/model/encoder/medmclip.py`). The loaded
encoders are checked against reference forwards written here with plain torch ops from the
weights, patch by patch, independent of the encoders' code.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from medmvl_cli.config.schema import M3dClipEncoder, MedmClipEncoder, VolumeConfig
from medmvl_cli.errors import ModelError
from medmvl_cli.model.connectors import build_connector
from medmvl_cli.model.encoders import encoder_from_recipe

SIZE, PATCH, HIDDEN, HEADS, MLP, LAYERS = (8, 16, 16), (4, 8, 8), 32, 4, 64, 2
GRID = tuple(s // p for s, p in zip(SIZE, PATCH))  # (2, 2, 2)
N_PATCHES = math.prod(GRID)
PATCH_DIM = math.prod(PATCH)
VOLUME = VolumeConfig(size=SIZE)


def _rand(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def m3d_vision_state() -> dict[str, torch.Tensor]:
    """M3D-CLIP's vision keys (MONAI 1.3 ViT, classification=True, qkv_bias=False), tiny sizes."""
    state = {
        "patch_embedding.position_embeddings": _rand(1, N_PATCHES, HIDDEN),
        "patch_embedding.patch_embeddings.1.weight": _rand(HIDDEN, PATCH_DIM),
        "patch_embedding.patch_embeddings.1.bias": _rand(HIDDEN),
        "cls_token": _rand(1, 1, HIDDEN),
        "norm.weight": 1 + _rand(HIDDEN), "norm.bias": _rand(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"blocks.{i}."
        state.update({
            p + "mlp.linear1.weight": _rand(MLP, HIDDEN), p + "mlp.linear1.bias": _rand(MLP),
            p + "mlp.linear2.weight": _rand(HIDDEN, MLP), p + "mlp.linear2.bias": _rand(HIDDEN),
            p + "norm1.weight": 1 + _rand(HIDDEN), p + "norm1.bias": _rand(HIDDEN),
            p + "attn.out_proj.weight": _rand(HIDDEN, HIDDEN), p + "attn.out_proj.bias": _rand(HIDDEN),
            p + "attn.qkv.weight": _rand(3 * HIDDEN, HIDDEN),
            p + "norm2.weight": 1 + _rand(HIDDEN), p + "norm2.bias": _rand(HIDDEN),
        })
    return state


def m3d_checkpoint(vision: dict) -> dict:
    """The whole released M3D-CLIP: vision tower, BERT text tower, projections, logit scale."""
    state = {f"vision_encoder.{k}": v for k, v in vision.items()}
    state.update({
        "language_encoder.embeddings.word_embeddings.weight": _rand(10, HIDDEN),
        "language_encoder.encoder.layer.0.attention.self.query.weight": _rand(HIDDEN, HIDDEN),
        "mm_vision_proj.weight": _rand(HIDDEN, HIDDEN), "mm_vision_proj.bias": _rand(HIDDEN),
        "mm_language_proj.weight": _rand(HIDDEN, HIDDEN), "mm_language_proj.bias": _rand(HIDDEN),
        "logit_scale": torch.tensor(2.0),
    })
    return state


def write_m3d(folder, state: dict, config: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    if config:
        (folder / "config.json").write_text(json.dumps({
            "model_type": "m3d_clip", "in_channels": 1, "img_size": list(SIZE), "patch_size": list(PATCH),
            "hidden_size": HIDDEN, "mlp_dim": MLP, "num_layers": LAYERS, "num_heads": HEADS,
            "pos_embed": "perceptron", "spatial_dims": 3,
        }))
    return folder


def medm_vision_state() -> dict[str, torch.Tensor]:
    """MedM-CLIP's vision keys (einops rearrange at index 0 of to_patch_embedding), tiny sizes."""
    state = {
        "to_patch_embedding.1.weight": 1 + _rand(PATCH_DIM), "to_patch_embedding.1.bias": _rand(PATCH_DIM),
        "to_patch_embedding.2.weight": _rand(HIDDEN, PATCH_DIM), "to_patch_embedding.2.bias": _rand(HIDDEN),
        "to_patch_embedding.3.weight": 1 + _rand(HIDDEN), "to_patch_embedding.3.bias": _rand(HIDDEN),
        "pos_embedding": _rand(1, N_PATCHES + 1, HIDDEN), "cls_token": _rand(1, 1, HIDDEN),
        "mlp_head.0.weight": 1 + _rand(HIDDEN), "mlp_head.0.bias": _rand(HIDDEN),
        "mlp_head.1.weight": _rand(HIDDEN, HIDDEN), "mlp_head.1.bias": _rand(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"transformer_layers.{i}."
        state.update({
            p + "self_attn.in_proj_weight": _rand(3 * HIDDEN, HIDDEN), p + "self_attn.in_proj_bias": _rand(3 * HIDDEN),
            p + "self_attn.out_proj.weight": _rand(HIDDEN, HIDDEN), p + "self_attn.out_proj.bias": _rand(HIDDEN),
            p + "linear1.weight": _rand(MLP, HIDDEN), p + "linear1.bias": _rand(MLP),
            p + "linear2.weight": _rand(HIDDEN, MLP), p + "linear2.bias": _rand(HIDDEN),
            p + "norm1.weight": 1 + _rand(HIDDEN), p + "norm1.bias": _rand(HIDDEN),
            p + "norm2.weight": 1 + _rand(HIDDEN), p + "norm2.bias": _rand(HIDDEN),
        })
    return state


def write_medm(folder, vision: dict):
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"vision_encoder.{k}": v for k, v in vision.items()}
    state["text_encoder.embeddings.word_embeddings.weight"] = _rand(10, HIDDEN)
    state["logit_scale"] = torch.tensor(2.0)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "medm-pretrain", "hidden_size": HIDDEN, "image_size": SIZE[1], "image_patch_size": PATCH[1],
        "frame_size": SIZE[0], "frame_patch_size": PATCH[0], "image_num_heads": HEADS,
        "image_mlp_dim": MLP, "image_num_layers": LAYERS,
    }))
    return folder


# ------------------------------------------------------------------------------ references
def _patches(volume: torch.Tensor, order) -> torch.Tensor:
    """(1, C, D, H, W) -> (n_patches, patch_dim), one patch at a time, grid order (d, h, w);
    each patch's (C, pd, ph, pw) block is permuted by `order` before flattening."""
    pd, ph, pw = PATCH
    rows = []
    for d in range(GRID[0]):
        for h in range(GRID[1]):
            for w in range(GRID[2]):
                block = volume[0, :, d * pd:(d + 1) * pd, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]
                rows.append(block.permute(*order).reshape(-1))
    return torch.stack(rows)


def _attention(x, q, k, v):
    """Multi-head softmax attention on (n, HIDDEN) projections."""
    n, hd = x.shape[0], HIDDEN // HEADS
    q, k, v = (t.reshape(n, HEADS, hd).transpose(0, 1) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    return (weights @ v).transpose(0, 1).reshape(n, HIDDEN)


def m3d_reference(vision: dict, volume: torch.Tensor, upto: int) -> torch.Tensor:
    """MONAI ViT as M3D runs it: rearrange 'b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)'."""
    s = vision
    x = _patches(volume, (1, 2, 3, 0)) @ s["patch_embedding.patch_embeddings.1.weight"].T
    x = x + s["patch_embedding.patch_embeddings.1.bias"] + s["patch_embedding.position_embeddings"][0]
    x = torch.cat([s["cls_token"][0], x])
    for i in range(upto):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (HIDDEN,), s[p + "norm1.weight"], s[p + "norm1.bias"])
        qkv = h @ s[p + "attn.qkv.weight"].T  # features laid out (qkv, head, dim)
        attn = _attention(h, qkv[:, :HIDDEN], qkv[:, HIDDEN:2 * HIDDEN], qkv[:, 2 * HIDDEN:])
        x = x + attn @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (HIDDEN,), s[p + "norm2.weight"], s[p + "norm2.bias"])
        h = F.gelu(h @ s[p + "mlp.linear1.weight"].T + s[p + "mlp.linear1.bias"])
        x = x + h @ s[p + "mlp.linear2.weight"].T + s[p + "mlp.linear2.bias"]
    return x


def medm_reference(vision: dict, volume: torch.Tensor, upto: int) -> torch.Tensor:
    """MedM-CLIP: x255, z-score, rearrange 'b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)',
    LN, Linear, LN, CLS, + pos, post-norm encoder layers with ReLU."""
    s = vision
    z = (volume * 255 - 55.6982188356434) / 66.1943479570918
    x = _patches(z, (2, 3, 1, 0))
    x = F.layer_norm(x, (PATCH_DIM,), s["to_patch_embedding.1.weight"], s["to_patch_embedding.1.bias"])
    x = x @ s["to_patch_embedding.2.weight"].T + s["to_patch_embedding.2.bias"]
    x = F.layer_norm(x, (HIDDEN,), s["to_patch_embedding.3.weight"], s["to_patch_embedding.3.bias"])
    x = torch.cat([s["cls_token"][0], x]) + s["pos_embedding"][0]
    for i in range(upto):
        p = f"transformer_layers.{i}."
        qkv = x @ s[p + "self_attn.in_proj_weight"].T + s[p + "self_attn.in_proj_bias"]
        attn = _attention(x, qkv[:, :HIDDEN], qkv[:, HIDDEN:2 * HIDDEN], qkv[:, 2 * HIDDEN:])
        attn = attn @ s[p + "self_attn.out_proj.weight"].T + s[p + "self_attn.out_proj.bias"]
        x = F.layer_norm(x + attn, (HIDDEN,), s[p + "norm1.weight"], s[p + "norm1.bias"])
        ff = torch.relu(x @ s[p + "linear1.weight"].T + s[p + "linear1.bias"])
        ff = ff @ s[p + "linear2.weight"].T + s[p + "linear2.bias"]
        x = F.layer_norm(x + ff, (HIDDEN,), s[p + "norm2.weight"], s[p + "norm2.bias"])
    return x


# ------------------------------------------------------------------------------ m3d_clip
@pytest.mark.parametrize("select_layer, feature", [(-1, "patch"), (-2, "cls_patch"), (0, "patch")])
def test_m3d_clip_matches_the_reference_forward(tmp_path, select_layer, feature):
    torch.manual_seed(0)
    vision = m3d_vision_state()
    folder = write_m3d(tmp_path / "m3d", m3d_checkpoint(vision))
    cfg = M3dClipEncoder(type="m3d_clip", path=str(folder), select_layer=select_layer, select_feature=feature)
    encoder = encoder_from_recipe(cfg, volume=VOLUME).eval()
    assert encoder.layout.grid == GRID and encoder.width == HIDDEN
    volume = torch.rand(1, 1, *SIZE)
    with torch.no_grad():
        out = encoder(volume)
    expected = m3d_reference(vision, volume, upto=select_layer % (LAYERS + 1))
    expected = expected if feature == "cls_patch" else expected[1:]
    assert out.shape == (1, N_PATCHES + (feature == "cls_patch"), HIDDEN)
    assert torch.allclose(out[0], expected, atol=1e-5)


def test_m3d_clip_reads_the_bare_pretrained_vit_bin(tmp_path):
    torch.manual_seed(1)
    vision = m3d_vision_state()
    folder = tmp_path / "m3d"
    folder.mkdir()
    torch.save(vision, folder / "pretrained_ViT.bin")  # un-prefixed, as M3D ships it
    (folder / "config.json").write_text(json.dumps({"img_size": list(SIZE), "patch_size": list(PATCH), "hidden_size": HIDDEN,
                                                    "mlp_dim": MLP, "num_layers": LAYERS, "num_heads": HEADS}))
    encoder = encoder_from_recipe(M3dClipEncoder(type="m3d_clip", path=str(folder)), volume=VOLUME).eval()
    volume = torch.rand(2, 1, *SIZE)
    with torch.no_grad():
        out = encoder(volume)
    assert torch.allclose(out[1], m3d_reference(vision, volume[1:], LAYERS)[1:], atol=1e-5)


def test_m3d_clip_missing_vision_key_is_an_error(tmp_path):
    vision = m3d_vision_state()
    del vision["blocks.1.attn.qkv.weight"]
    folder = write_m3d(tmp_path / "m3d", m3d_checkpoint(vision))
    with pytest.raises(ModelError, match=r"missing vision keys: vision_encoder\.blocks\.1\.attn\.qkv\.weight"):
        encoder_from_recipe(M3dClipEncoder(type="m3d_clip", path=str(folder)), volume=VOLUME)


def test_m3d_clip_unexpected_vision_key_is_an_error(tmp_path):
    vision = m3d_vision_state()
    vision["blocks.0.attn.qkv.bias"] = _rand(3 * HIDDEN)  # a ViT trained with qkv_bias=True
    folder = write_m3d(tmp_path / "m3d", m3d_checkpoint(vision))
    with pytest.raises(ModelError, match=r"unexpected vision keys: vision_encoder\.blocks\.0\.attn\.qkv\.bias"):
        encoder_from_recipe(M3dClipEncoder(type="m3d_clip", path=str(folder)), volume=VOLUME)


def test_m3d_clip_key_of_no_known_tower_is_an_error(tmp_path):
    state = m3d_checkpoint(m3d_vision_state())
    state["segmentation_module.decoder.weight"] = _rand(4, 4)
    folder = write_m3d(tmp_path / "m3d", state)
    with pytest.raises(ModelError, match="keys of no known tower: segmentation_module.decoder.weight"):
        encoder_from_recipe(M3dClipEncoder(type="m3d_clip", path=str(folder)), volume=VOLUME)


def test_m3d_clip_wrong_shapes_and_sizes_are_errors(tmp_path):
    folder = write_m3d(tmp_path / "m3d", m3d_checkpoint(m3d_vision_state()), config=False)
    # Without config.json the sizes are M3D's (hidden 768, ...), which these weights do not have.
    with pytest.raises(ModelError, match="does not divide|volume.size"):
        encoder_from_recipe(M3dClipEncoder(type="m3d_clip", path=str(folder)), volume=VOLUME)
    with pytest.raises(ModelError, match="shape mismatch"):
        encoder_from_recipe(M3dClipEncoder(type="m3d_clip", path=str(folder)), volume=VolumeConfig(size=(32, 256, 256)))
    write_m3d(folder, m3d_checkpoint(m3d_vision_state()))
    with pytest.raises(ModelError, match=r"M3D-CLIP takes \[8, 16, 16\]"):
        encoder_from_recipe(M3dClipEncoder(type="m3d_clip", path=str(folder)), volume=VolumeConfig(size=(8, 32, 32)))


def test_a_folder_without_weights_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no weights in"):
        encoder_from_recipe(M3dClipEncoder(type="m3d_clip", path=str(tmp_path / "empty")), volume=VolumeConfig(size=(32, 256, 256)))


# ------------------------------------------------------------------------------ medm_clip
@pytest.mark.parametrize("select_layer, feature", [(-1, "patch"), (-2, "cls_patch")])
def test_medm_clip_matches_the_reference_forward(tmp_path, select_layer, feature):
    torch.manual_seed(2)
    vision = medm_vision_state()
    folder = write_medm(tmp_path / "medm", vision)
    cfg = MedmClipEncoder(type="medm_clip", path=str(folder), select_layer=select_layer, select_feature=feature)
    encoder = encoder_from_recipe(cfg, volume=VOLUME).eval()
    volume = torch.rand(2, 1, *SIZE)
    with torch.no_grad():
        out = encoder(volume)
    for i in range(2):
        expected = medm_reference(vision, volume[i:i + 1], upto=select_layer % (LAYERS + 1))
        expected = expected if feature == "cls_patch" else expected[1:]
        assert torch.allclose(out[i], expected, atol=1e-4)


def test_medm_clip_key_errors(tmp_path):
    vision = medm_vision_state()
    del vision["mlp_head.1.bias"]  # part of the released vision tower even though unused
    vision["transformer_layers.2.norm1.weight"] = _rand(HIDDEN)  # one layer too many
    folder = write_medm(tmp_path / "medm", vision)
    with pytest.raises(ModelError) as err:
        encoder_from_recipe(MedmClipEncoder(type="medm_clip", path=str(folder)), volume=VOLUME)
    assert "missing vision keys: vision_encoder.mlp_head.1.bias" in str(err.value)
    assert "unexpected vision keys: vision_encoder.transformer_layers.2.norm1.weight" in str(err.value)


def test_medm_clip_features_are_not_detached(tmp_path):
    folder = write_medm(tmp_path / "medm", medm_vision_state())
    encoder = encoder_from_recipe(MedmClipEncoder(type="medm_clip", path=str(folder)), volume=VOLUME).train()
    encoder(torch.rand(1, 1, *SIZE)).sum().backward()
    grads = {n: p.grad for n, p in encoder.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]


@pytest.mark.parametrize("connector, tokens", [
    ({"type": "mlp"}, N_PATCHES), ({"type": "spatial_pooling", "pool": 2}, 1),
    ({"type": "attention_pooling", "heads": 4}, 4),  # default queries: gh * gw of the (2, 2, 2) grid
])
@pytest.mark.parametrize("kind", ["m3d_clip", "medm_clip"])
def test_released_encoders_with_every_connector(tmp_path, kind, connector, tokens):
    if kind == "m3d_clip":
        cfg = M3dClipEncoder(type="m3d_clip", path=str(write_m3d(tmp_path / "e", m3d_checkpoint(m3d_vision_state()))))
    else:
        cfg = MedmClipEncoder(type="medm_clip", path=str(write_medm(tmp_path / "e", medm_vision_state())))
    encoder = encoder_from_recipe(cfg, volume=VOLUME)
    head = build_connector(connector, encoder.layout, encoder.width, 48)
    assert head.num_tokens == tokens
    assert head(encoder(torch.rand(3, 1, *SIZE))).shape == (3, tokens, 48)
