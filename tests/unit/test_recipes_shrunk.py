"""Every shipped recipe builds with its real structure at tiny widths and trains one step.

As litgpt's and torchtune's config tests do: the recipe's own encoder / connector / LLM families,
feature layers, connector settings, template, trainable parts and LoRA stay as written; only the
pretrained weights are swapped for tiny random ones built in code, offline. Each HF model a recipe
names maps to a tiny model of the same architecture (Qwen2.5 -> the tiny Qwen2 preset, Llama 3.2 ->
the tiny Llama preset, SigLIP -> the tiny SigLIP preset); M3D-CLIP gets a tiny folder in its released
layout (config.json + `vision_encoder.*` weights), read by the same loader as the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medmvl_cli.config.loader import load_recipe
from medmvl_cli.constants import BRANCH_PLACEHOLDERS
from tests.conftest import RECIPES

SHIPPED = sorted([*RECIPES.glob("medmvl-2d/*.yaml"), *RECIPES.glob("medmvl-ct/*.yaml"),
                  *RECIPES.glob("benchmarks/*.yaml")])
# The LLMs the recipes name -> the tiny preset of the same architecture.
LLM_SHRINK = {"Qwen/Qwen2.5-3B-Instruct": "tiny-qwen2", "meta-llama/Llama-3.2-3B-Instruct": "tiny-llama"}
# A tiny M3D-CLIP: the released layout (MONAI ViT, perceptron patches, CLS token, no qkv bias).
M3D_SIZE, M3D_PATCH, M3D_HIDDEN, M3D_HEADS, M3D_MLP, M3D_LAYERS = (8, 32, 32), (4, 8, 8), 64, 4, 128, 2
SLICES = 4  # slices of a volume for `slices` encoders (the recipe's 32, shrunk)


def write_tiny_m3d_clip(folder: Path) -> Path:
    """A whole M3D-CLIP checkpoint at tiny sizes: vision tower under `vision_encoder.`, plus the
    text-side keys the loader must recognise and drop."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    grid = [s // p for s, p in zip(M3D_SIZE, M3D_PATCH)]
    patch_dim = M3D_PATCH[0] * M3D_PATCH[1] * M3D_PATCH[2]
    h, m = M3D_HIDDEN, M3D_MLP
    vision = {
        "patch_embedding.position_embeddings": torch.randn(1, grid[0] * grid[1] * grid[2], h) * 0.02,
        "patch_embedding.patch_embeddings.1.weight": torch.randn(h, patch_dim) * 0.02,
        "patch_embedding.patch_embeddings.1.bias": torch.zeros(h),
        "cls_token": torch.zeros(1, 1, h), "norm.weight": torch.ones(h), "norm.bias": torch.zeros(h),
    }
    for i in range(M3D_LAYERS):
        p = f"blocks.{i}."
        vision.update({
            p + "mlp.linear1.weight": torch.randn(m, h) * 0.02, p + "mlp.linear1.bias": torch.zeros(m),
            p + "mlp.linear2.weight": torch.randn(h, m) * 0.02, p + "mlp.linear2.bias": torch.zeros(h),
            p + "norm1.weight": torch.ones(h), p + "norm1.bias": torch.zeros(h),
            p + "attn.out_proj.weight": torch.randn(h, h) * 0.02, p + "attn.out_proj.bias": torch.zeros(h),
            p + "attn.qkv.weight": torch.randn(3 * h, h) * 0.02,
            p + "norm2.weight": torch.ones(h), p + "norm2.bias": torch.zeros(h),
        })
    state = {f"vision_encoder.{k}": v for k, v in vision.items()}
    state.update({"mm_vision_proj.weight": torch.randn(h, h), "logit_scale": torch.tensor(2.0)})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "m3d_clip", "in_channels": 1, "img_size": list(M3D_SIZE), "patch_size": list(M3D_PATCH),
        "hidden_size": h, "mlp_dim": m, "num_layers": M3D_LAYERS, "num_heads": M3D_HEADS,
        "pos_embed": "perceptron", "spatial_dims": 3,
    }))
    return folder


@pytest.fixture(scope="module")
def tiny_m3d_clip(tmp_path_factory) -> Path:
    return write_tiny_m3d_clip(tmp_path_factory.mktemp("m3d-clip"))


def shrink_overrides(full, m3d_clip: Path) -> list[str]:
    """Overrides that swap weights for tiny ones and keep every structural choice of `full`."""
    llm = full.model.llm
    assert llm.path in LLM_SHRINK, f"add a tiny stand-in for {llm.path} to LLM_SHRINK"
    out = ["init_from=null", "model.llm.path=null", f"model.llm.preset={LLM_SHRINK[llm.path]}",
           "model.llm.dtype=float32", "distributed.deepspeed=null"]
    for branch in ("image", "image3d"):
        section = getattr(full.model, branch)
        if section is None:
            continue
        enc = section.encoder
        keep = f"select_layer: {enc.select_layer}, select_feature: {enc.select_feature}"
        if enc.type in ("clip", "siglip"):
            out.append(f"model.{branch}.encoder={{type: {enc.type}, preset: tiny, {keep}}}")
        elif enc.type == "slices":
            out.append(f"model.{branch}.encoder={{type: slices, base: {enc.base}, preset: tiny, "
                       f"num_slices: {SLICES}, {keep}}}")
            out.append(f"model.{branch}.volume.size=[{SLICES}, 32, 32]")
        elif enc.type == "m3d_clip":
            out.append(f"model.{branch}.encoder={{type: m3d_clip, path: {m3d_clip}, {keep}}}")
            out.append(f"model.{branch}.volume.size=[{', '.join(map(str, M3D_SIZE))}]")
        else:
            raise AssertionError(f"no tiny stand-in for encoder type {enc.type!r}: add one here")
    return out


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_recipe_builds_shrunken_and_trains_one_step(recipe, tiny_m3d_clip):
    from medmvl_cli.data.templates import get_template
    from medmvl_cli.model.builder import build_model
    from medmvl_cli.model.trainable import apply_lora, apply_trainable

    full = load_recipe(recipe)
    shrunk = load_recipe(recipe, shrink_overrides(full, tiny_m3d_clip))
    # The structure is the recipe's: same stage, template, connectors, trainable parts and LoRA.
    assert (shrunk.stage, shrunk.model.llm.template, shrunk.trainable, shrunk.lora) == \
        (full.stage, full.model.llm.template, full.trainable, full.lora)
    for branch in ("image", "image3d"):
        if getattr(full.model, branch) is not None:
            assert getattr(shrunk.model, branch).connector == getattr(full.model, branch).connector
            assert getattr(shrunk.model, branch).encoder.type == getattr(full.model, branch).encoder.type

    torch.manual_seed(0)
    model, tokenizer, _ = build_model(shrunk, dtype="float32")
    apply_trainable(model, shrunk.trainable)
    if shrunk.trainable.llm == "lora":
        apply_lora(model, shrunk.lora)
    branches = [b for b in ("image", "image3d") if getattr(shrunk.model, b) is not None]
    lengths = {BRANCH_PLACEHOLDERS[b]: model.num_tokens(b) for b in branches}
    question = "".join(f"{BRANCH_PLACEHOLDERS[b]}\n" for b in branches) + "What is shown?"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "A normal scan."}]
    encoded = get_template(shrunk.model.llm.template).encode(tokenizer, messages, lengths)
    inputs = {"input_ids": torch.tensor([encoded.input_ids]), "labels": torch.tensor([encoded.labels])}
    if "image" in branches:
        inputs["pixel_values"] = torch.randn(1, 3, 32, 32)
    if "image3d" in branches:
        inputs["volumes"] = torch.rand(1, 1, *shrunk.model.image3d.volume.size)

    model.train()
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name in model.components():
        params = list(getattr(model, name).parameters())
        got_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        trains = any(p.requires_grad for p in params)
        assert got_grad == trains, f"{name}: trainable {trains} but gradient {got_grad}"
