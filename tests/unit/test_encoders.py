"""Encoders on the built-in presets: widths, token layouts, output shapes, feature selection."""

from __future__ import annotations

import json

import pytest
import torch

from medmvl_cli.config.schema import ClipEncoder, SiglipEncoder, SlicesEncoder, Vit3dEncoder, VolumeConfig
from medmvl_cli.errors import ModelError
from medmvl_cli.model.encoders import ENCODERS, encoder_from_arch, encoder_from_recipe
from medmvl_cli.model.encoders.base import TokenLayout

VOLUME = VolumeConfig(size=(8, 32, 32))


def clip(**kw):
    return ClipEncoder(type="clip", preset="tiny", **kw)


def siglip(**kw):
    return SiglipEncoder(type="siglip", preset="tiny", **kw)


def test_registry_has_every_backend():
    assert set(ENCODERS) == {"clip", "siglip", "vit3d", "m3d_clip", "medm_clip", "slices"}


@pytest.mark.parametrize(
    "cfg, tokens, cls_tokens",
    [
        (clip(), 16, 0),  # 32 px / 8 px patches; CLS dropped
        (clip(select_feature="cls_patch"), 17, 1),
        (siglip(), 16, 0),
        (siglip(select_feature="cls_patch"), 16, 0),  # SigLIP has no CLS: same tokens as `patch`
    ],
)
def test_2d_towers_tokens_and_shapes(cfg, tokens, cls_tokens):
    encoder = encoder_from_recipe(cfg).eval()
    assert encoder.layout == TokenLayout((4, 4), cls_tokens)
    assert encoder.num_tokens == tokens and encoder.width == 64
    out = encoder(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, tokens, 64)


def test_clip_select_layer_and_feature_follow_llava():
    encoder = encoder_from_recipe(clip(select_layer=-2)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states = encoder.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert len(states) == 3  # embeddings + 2 layers
        assert torch.equal(encoder(pixels), states[-2][:, 1:])
        with_cls = encoder_from_arch({**encoder.arch, "select_feature": "cls_patch", "select_layer": 0})
        with_cls.load_state_dict(encoder.state_dict())
        assert torch.equal(with_cls.eval()(pixels), states[0])


def test_select_layer_out_of_range_is_an_error():
    with pytest.raises(ModelError, match="select_layer 5 is out of range"):
        encoder_from_recipe(clip(select_layer=5))
    with pytest.raises(ModelError, match="select_layer -4"):
        encoder_from_recipe(Vit3dEncoder(type="vit3d", preset="tiny", select_layer=-4), volume=VOLUME)


@pytest.mark.parametrize("feature, tokens", [("patch", 32), ("cls_patch", 33)])
def test_vit3d_tokens_follow_volume_size(feature, tokens):
    encoder = encoder_from_recipe(Vit3dEncoder(type="vit3d", preset="tiny", select_feature=feature), volume=VOLUME)
    assert encoder.layout.grid == (2, 4, 4)  # (8, 32, 32) / (4, 8, 8)
    assert encoder.num_tokens == tokens and encoder.width == 64
    assert encoder(torch.rand(2, 1, 8, 32, 32)).shape == (2, tokens, 64)


def test_vit3d_without_cls_token():
    encoder = encoder_from_recipe(Vit3dEncoder(type="vit3d", preset="tiny", select_feature="cls_patch"), volume=VOLUME)
    plain = encoder_from_arch({**encoder.arch, "cls_token": False})
    assert not hasattr(plain.vit, "cls_token")
    assert plain.layout == TokenLayout((2, 4, 4), 0)  # nothing to include
    assert plain(torch.rand(1, 1, 8, 32, 32)).shape == (1, 32, 64)


def test_vit3d_select_layer_zero_is_the_patch_embedding():
    encoder = encoder_from_recipe(Vit3dEncoder(type="vit3d", preset="tiny", select_layer=0), volume=VOLUME)
    volume = torch.rand(1, 1, 8, 32, 32)
    expected = encoder.vit.patch_embedding((volume - 0.5) / 0.5)  # centred input, see below
    assert torch.allclose(encoder(volume), expected)


def test_vit3d_rejects_patch_sizes_that_do_not_divide_the_volume():
    with pytest.raises(ModelError, match=r"patch size \[3, 8, 8\] does not divide"):
        encoder_from_recipe(Vit3dEncoder(type="vit3d", preset="tiny", patch_size=(3, 8, 8)), volume=VOLUME)


def test_vit3d_rejects_volumes_of_the_wrong_size():
    encoder = encoder_from_recipe(Vit3dEncoder(type="vit3d", preset="tiny"), volume=VOLUME)
    with pytest.raises(ModelError, match=r"takes \(N, 1, 8, 32, 32\)"):
        encoder(torch.rand(1, 1, 8, 16, 16))


def test_vit3d_saved_folder_loads_back(tmp_path):
    encoder = encoder_from_recipe(Vit3dEncoder(type="vit3d", preset="tiny"), volume=VOLUME).eval()
    encoder.save_pretrained(tmp_path / "vit")
    again = encoder_from_recipe(Vit3dEncoder(type="vit3d", path=str(tmp_path / "vit")), volume=VOLUME).eval()
    volume = torch.rand(1, 1, 8, 32, 32)
    assert torch.equal(encoder(volume), again(volume))
    with pytest.raises(ModelError, match="trained on volumes of"):
        encoder_from_recipe(Vit3dEncoder(type="vit3d", path=str(tmp_path / "vit")), volume=VolumeConfig(size=(8, 16, 16)))


def test_vit3d_centres_its_input_and_keeps_what_a_folder_was_trained_on(tmp_path):
    encoder = encoder_from_recipe(Vit3dEncoder(type="vit3d", preset="tiny"), volume=VOLUME)
    assert encoder.arch["input_norm"] == [0.5, 0.5]
    assert encoder.normalize(torch.tensor([0.0, 0.25, 1.0])).tolist() == [-1.0, -0.5, 1.0]
    encoder.save_pretrained(tmp_path / "vit")
    assert json.loads((tmp_path / "vit" / "config.json").read_text())["input_norm"] == [0.5, 0.5]
    # A folder (or a saved medmvl model) from before the key existed was trained on raw [0, 1].
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    del config["input_norm"]
    (tmp_path / "vit" / "config.json").write_text(json.dumps(config))
    older = encoder_from_recipe(Vit3dEncoder(type="vit3d", path=str(tmp_path / "vit")), volume=VOLUME)
    assert older.arch["input_norm"] is None
    assert encoder_from_arch({k: v for k, v in encoder.arch.items() if k != "input_norm"}).input_norm is None
    volume = torch.rand(1, 1, 8, 32, 32)
    assert torch.equal(older.normalize(volume), volume)
    for damaged in ([0.5, 0], [0.5], "0.5", [0.5, float("nan")], [True, 1]):
        config["input_norm"] = damaged
        (tmp_path / "vit" / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelError, match="input_norm"):
            encoder_from_recipe(Vit3dEncoder(type="vit3d", path=str(tmp_path / "vit")), volume=VOLUME)


def test_vit3d_first_layernorm_tells_dark_from_bright_tissue():
    """Why vit3d centres its input: a uniform patch embeds along one direction scaled by its
    intensity, and LayerNorm divides the scale out. On raw [0, 1] input an aerated lung patch (HU -850)
    and a consolidated one (HU +40) reach the first block nearly alike; centred, they point apart."""
    torch.manual_seed(0)
    encoder = encoder_from_recipe(Vit3dEncoder(type="vit3d", preset="tiny"), volume=VOLUME).eval()
    lung, consolidation = torch.full((1, 1, 8, 32, 32), 0.075), torch.full((1, 1, 8, 32, 32), 0.52)

    def first_block_input(volume):
        with torch.no_grad():
            return encoder.vit.blocks[0].norm1(encoder.vit.hidden_states(encoder.normalize(volume), 0)[:, 1:])

    def similarity():
        return torch.nn.functional.cosine_similarity(first_block_input(lung), first_block_input(consolidation), dim=-1).mean()

    assert similarity() < 0
    encoder.input_norm = None
    assert similarity() > 0.5


@pytest.mark.parametrize("base, feature, per_slice, cls", [
    ("clip", "patch", 16, 0), ("clip", "cls_patch", 17, 8), ("siglip", "patch", 16, 0),
])
def test_slices_encoder_concatenates_slices(base, feature, per_slice, cls):
    cfg = SlicesEncoder(type="slices", base=base, preset="tiny", num_slices=8, select_feature=feature)
    encoder = encoder_from_recipe(cfg, volume=VOLUME).eval()
    assert encoder.layout == TokenLayout((8, 4, 4), cls)
    assert encoder.num_tokens == 8 * per_slice
    volume = torch.rand(2, 1, 8, 48, 40)  # any H, W: resized to the tower's 32 px
    out = encoder(volume)
    assert out.shape == (2, 8 * per_slice, 64)
    # Slice 3 of sample 1 is the 2D tower applied to that slice, resized and normalised.
    image = torch.nn.functional.interpolate(volume[1:2, :, 3], size=(32, 32), mode="bilinear", align_corners=False)
    mean = torch.tensor(encoder.base.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.base.image_std).view(1, 3, 1, 1)
    expected = encoder.base((image.expand(-1, 3, -1, -1) - mean) / std)
    assert torch.allclose(out[1, 3 * per_slice: 4 * per_slice], expected[0], atol=1e-5)


def test_slices_needs_num_slices_equal_to_volume_depth():
    # The rule lives in the recipe schema (the one validator of recipe values).
    from pydantic import ValidationError

    from medmvl_cli.config.schema import Image3dBranch

    cfg = SlicesEncoder(type="slices", base="clip", preset="tiny", num_slices=4)
    with pytest.raises(ValidationError, match="num_slices is 4"):
        Image3dBranch(encoder=cfg, connector={"type": "mlp"}, volume=VOLUME)


def test_from_arch_rebuilds_the_same_architecture():
    for cfg, volume in ((clip(), None), (siglip(), None), (Vit3dEncoder(type="vit3d", preset="tiny"), VOLUME),
                        (SlicesEncoder(type="slices", base="siglip", preset="tiny", num_slices=8), VOLUME)):
        encoder = encoder_from_recipe(cfg, volume=volume)
        rebuilt = encoder_from_arch(encoder.arch)
        assert rebuilt.layout == encoder.layout and rebuilt.width == encoder.width
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in encoder.state_dict().items()}


def test_encoders_train_with_gradient_checkpointing():
    encoder = encoder_from_recipe(Vit3dEncoder(type="vit3d", preset="tiny"), volume=VOLUME).train()
    volume = torch.rand(2, 1, 8, 32, 32)
    loss = encoder(volume).square().mean()
    loss.backward()
    plain = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad()
    from torch.utils.checkpoint import checkpoint

    encoder.vit.gradient_checkpointing = True
    encoder.vit._gradient_checkpointing_func = lambda fn, *a: checkpoint(fn, *a, use_reentrant=False)
    encoder(volume).square().mean().backward()
    assert set(plain) == {n for n, p in encoder.named_parameters() if p.grad is not None}
    for name, grad in plain.items():
        assert torch.allclose(grad, dict(encoder.named_parameters())[name].grad, atol=1e-6), name


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_whole_clip_and_siglip_checkpoints_load_their_vision_tower(tmp_path, kind):
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    if kind == "clip":
        whole = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
        cfg = ClipEncoder(type="clip", path=str(tmp_path / "w"))
    else:
        whole = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
        cfg = SiglipEncoder(type="siglip", path=str(tmp_path / "w"))
    whole.save_pretrained(tmp_path / "w")
    encoder = encoder_from_recipe(cfg).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = whole.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(encoder(pixels), expected[:, 1:] if kind == "clip" else expected)
    weights = load_file(str(tmp_path / "w" / "model.safetensors"))
    dropped = next(k for k in weights if "vision_model.encoder.layers.1.mlp.fc1.weight" in k)
    del weights[dropped]
    save_file(weights, str(tmp_path / "w" / "model.safetensors"))
    with pytest.raises(ModelError, match="lacks vision weights: .*layers.1.mlp.fc1.weight"):
        encoder_from_recipe(cfg)
