"""Parity with transformers' LLaVA: our CLIP / SigLIP + MLP(2, GELU) + Qwen2 / Llama stack, its
weights written under LLaVA's on-disk names (`vision_tower.*`, `multi_modal_projector.linear_{1,2}.*`,
`language_model.*`) and loaded by `LlavaForConditionalGeneration`, gives the same logits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from medmvl_cli.config.loader import load_recipe
from medmvl_cli.model.builder import build_model

RECIPE = """
model:
  llm: {{preset: {llm}, attn_implementation: sdpa}}
  image:
    encoder: {{type: {encoder}, preset: tiny, select_layer: -2, select_feature: patch}}
    connector: {{type: mlp, depth: 2, activation: gelu}}
"""


def llava_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under LLaVA's checkpoint key names."""
    projector = {"mlp.0.": "linear_1.", "mlp.2.": "linear_2."}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("llm."):
            name = "language_model." + key[len("llm."):]
        elif key.startswith("image_encoder.tower."):
            name = "vision_tower." + key[len("image_encoder.tower."):]
        elif key.startswith("image_connector."):
            inner = key[len("image_connector."):]
            prefix = next(p for p in projector if inner.startswith(p))
            name = "multi_modal_projector." + projector[prefix] + inner[len(prefix):]
        else:
            raise AssertionError(f"unmapped key {key}")
        state[name] = value.detach().clone().contiguous()
    return state


@pytest.mark.parametrize("encoder, llm, strategy", [("clip", "tiny-qwen2", "default"), ("siglip", "tiny-llama", "full")])
def test_logits_match_transformers_llava(tmp_path, encoder, llm, strategy):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(llm=llm, encoder=encoder))
    torch.manual_seed(0)
    model, tokenizer, processor = build_model(load_recipe(path))
    model.eval()
    image_id = model.config.image_token_id

    config = LlavaConfig(
        vision_config=model.image_encoder.tower.config.to_dict(),
        text_config=model.llm.config.to_dict(),
        image_token_index=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=model.num_tokens("image"),
        tie_word_embeddings=model.llm.config.tie_word_embeddings,
    )
    folder = tmp_path / "llava"
    config.save_pretrained(folder)
    save_file(llava_state_dict(model), str(folder / "model.safetensors"))
    llava, info = LlavaForConditionalGeneration.from_pretrained(
        folder, attn_implementation="sdpa", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    llava.eval()

    from PIL import Image

    rng = torch.Generator().manual_seed(1)
    picture = Image.fromarray((torch.rand(40, 48, 3, generator=rng) * 255).to(torch.uint8).numpy())
    pixels = processor(images=picture, return_tensors="pt")["pixel_values"]
    text = tokenizer("Describe the finding:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([text[:3] + [image_id] * model.num_tokens("image") + text[3:]])
    assert model.num_tokens("image") == 16  # 4x4 patches, CLS dropped (CLIP) / none (SigLIP)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
        theirs = llava(input_ids=ids, pixel_values=pixels).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
