"""`medmvl import medm-vl` on tiny checkpoints written in MedM-VL's exact layout.

Each imported model is checked against a reference forward written here from the checkpoint's
weights the way MedM-VL's own code computes it (lvlm/model/modeling_lvlm.py and its encoders /
connectors): HF vision towers indexed by `hidden_states[select_layer]`, M3D's MONAI ViT returning
its block outputs, `nn.MultiheadAttention` pooling with learned queries, connector outputs averaged
over slices for `--slice-pooling mean` (MedM-VL before its release day), features spliced into the
prompt between its text chunks. test_import_medmvl_fixtures.py checks checkpoints and logits that
MedM-VL's own code wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from medmvl_cli.errors import ModelError, RunError
from medmvl_cli.interop.medm_vl.importer import import_medm_vl
from medmvl_cli.model.builder import load_model

runner = CliRunner()
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CORPUS = [SYSTEM, "USER: ASSISTANT: Is there a nodule in the right lung? Yes, a small one.",
          "Describe the findings. The lungs are clear. No effusion. Which lobe? The left lower lobe."] * 4


def flat(output: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


# ---------------------------------------------------------------------------------- tiny parts
def make_tokenizer(folder: Path):
    """A byte-level BPE tokenizer with Qwen2's special tokens and no <image> tokens (MedM-VL's LLMs
    have none: it splices features at ids outside the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def make_llm(folder: Path, vocab: int, tied: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=1e6)
    llm = Qwen2ForCausalLM(config).eval()
    config.save_pretrained(folder)  # the LLM folder MedM-VL re-reads its config from
    return llm


def make_vision(folder: Path, kind: str, seed: int = 1):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(seed)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                 patch_size=8)
    if kind == "siglip":
        config, tower = SiglipVisionConfig(**sizes), SiglipVisionModel
        processor = SiglipImageProcessor(size={"height": 16, "width": 16})
    else:
        config, tower = CLIPVisionConfig(**sizes), CLIPVisionModel
        processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    model = tower(config).eval()
    for p in model.parameters():  # break the tidy init (LayerNorm = 1 / 0) so that every weight matters
        p.data.add_(torch.randn_like(p) * 0.05)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def mlp(state: dict, prefix: str, width_in: int, width_out: int) -> nn.Sequential:
    torch.manual_seed(2)
    layers = nn.Sequential(nn.Linear(width_in, width_out), nn.GELU(), nn.Linear(width_out, width_out))
    state.update({f"{prefix}connector.{k}": v for k, v in layers.state_dict().items()})
    return layers


def attn_pooling(state: dict, prefix: str, queries: int, width: int) -> tuple[torch.Tensor, nn.MultiheadAttention]:
    torch.manual_seed(3)
    attn = nn.MultiheadAttention(width, 8, batch_first=True)
    query = torch.randn(queries, width)
    state[f"{prefix}query"] = query
    state.update({f"{prefix}attn.{k}": v for k, v in attn.state_dict().items()})
    return query, attn


def lvlm_config(**fields) -> dict:
    """MedM-VL's config.json: model_type lvlm and the flat lvlm_* fields (plus what PretrainedConfig adds)."""
    config = {"model_type": "lvlm", "architectures": ["LVLMForConditionalGeneration"], "transformers_version": "4.46.0",
              "lvlm_llm_type": "qwen2", "lvlm_llm_name_or_path": "Qwen/Qwen2.5-3B-Instruct", "lvlm_llm_max_length": 512,
              "lvlm_llm_padding_side": "right", "lvlm_llm_attn_implementation": "flash_attention_2",
              "hidden_size": 64, "lvlm_llm_initializer_range": 0.02}
    for branch in ("image", "image3d"):
        for name in ("encoder_{}_type", "encoder_{}_name_or_path", "encoder_{}_select_layer", "encoder_{}_select_feature",
                     "connector_{}_type", "connector_{}_name", "connector_{}_path"):
            config["lvlm_" + name.format(branch)] = None
    config.update({f"lvlm_{k}": v for k, v in fields.items()})
    return config


def write_checkpoint(folder: Path, config: dict, state: dict, tokenizer=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def llm_state(llm, tied: bool) -> dict:
    state = {f"llm.{k}": v for k, v in llm.state_dict().items()}
    if tied:
        state.pop("llm.lm_head.weight")
    return state


def medmvl_prompt_embeds(llm, tokenizer, question: str, placeholder: str, features: torch.Tensor) -> torch.Tensor:
    """MedM-VL's prompt ("<system> USER: {q} ASSISTANT:"), its text chunks tokenised around the
    placeholder and the features spliced in between. (1, L, hidden)."""
    prompt = f"{SYSTEM} USER: {question.strip()} ASSISTANT:"
    before, after = prompt.split(placeholder)
    embed = llm.get_input_embeddings()
    parts = [embed(torch.tensor(tokenizer(before, add_special_tokens=False)["input_ids"])), features,
             embed(torch.tensor(tokenizer(after, add_special_tokens=False)["input_ids"]))]
    return torch.cat(parts)[None]


# ---------------------------------------------------------------------------------- CT-Chest
QUESTION_3D = "<image3d>\nIs there a nodule in the right lung?"
SLICES, SIDE = 4, 16


@pytest.fixture(scope="module")
def ct_chest(tmp_path_factory):
    """A tiny MedM-VL CT-Chest checkpoint: SigLIP (cls_patch, layer -1) over the slices, attn_pooling
    mlp2x_gelu, Qwen2 without room for new tokens (the embeddings must grow)."""
    root = tmp_path_factory.mktemp("ct_chest")
    tokenizer = make_tokenizer(root / "tokenizer")
    llm = make_llm(root / "qwen", vocab=len(tokenizer), tied=False)
    tower, processor = make_vision(root / "siglip", "siglip")
    state = llm_state(llm, tied=False)
    state.update({f"encoder_image.encoder.vision_model.{k}": v for k, v in tower.state_dict().items()})
    query, attn = attn_pooling(state, "connector_image.", queries=4, width=32)
    head = mlp(state, "connector_image.", 32, 64)
    config = lvlm_config(llm_name_or_path=str(root / "qwen"), encoder_image_type="siglip",
                         encoder_image_name_or_path=str(root / "siglip"), encoder_image_select_layer=-1,
                         encoder_image_select_feature="cls_patch", connector_image_type="attn_pooling",
                         connector_image_name="mlp2x_gelu")
    src = write_checkpoint(root / "MedM-VL-CT-Chest", config, state, tokenizer)
    parts = {"llm": llm, "tower": tower, "processor": processor, "query": query, "attn": attn, "mlp": head,
             "tokenizer": tokenizer}
    return root, src, parts


def ct_reference_logits(parts: dict, volume_u8: np.ndarray, question: str = QUESTION_3D) -> torch.Tensor:
    """The [0, 255] volume as uint8 through the SigLIP processor slice by slice, the 2D encoder and
    connector per slice, the connector outputs averaged over slices (`--slice-pooling mean`)."""
    slices = torch.from_numpy(volume_u8)[:, None].expand(-1, 3, -1, -1)  # (D, 3, H, W) uint8
    pixels = parts["processor"](slices, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = parts["tower"](pixels, output_hidden_states=True).hidden_states[-1]  # cls_patch: every token
        queries = parts["query"][None].repeat(features.shape[0], 1, 1)
        pooled, _ = parts["attn"](queries, features, features)
        per_slice = parts["mlp"](pooled)  # (D, 4, 64)
        features = per_slice.view(1, SLICES, *per_slice.shape[1:]).mean(dim=1)[0]
        embeds = medmvl_prompt_embeds(parts["llm"], parts["tokenizer"], question, "<image3d>", features)
        return parts["llm"](inputs_embeds=embeds).logits[0]


def our_logits(model_dir: Path, messages: list[dict], **media) -> torch.Tensor:
    from medmvl_cli.inference.generate import Predictor

    predictor = Predictor(model_dir)
    ids = predictor.prompt_ids(messages)
    with torch.no_grad():
        return predictor.model(input_ids=torch.tensor([ids]), **media).logits[0]


def hu_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume D x S x S, the [0, 255] uint8 volume MedM-VL's preprocessing makes of it): every
    voxel above -1000 HU (nothing to crop), already at 4 x 16 x 16 (nothing to resize)."""
    rng = np.random.default_rng(seed)
    u8 = rng.integers(1, 256, size=(SLICES, SIDE, SIDE)).astype(np.uint8)
    return (u8.astype(np.float64) / 255.0 * 2000.0 - 1000.0).astype(np.float32), u8


def test_ct_chest_import_gives_medmvl_logits(ct_chest, tmp_path):
    root, src, parts = ct_chest
    result = runner.invoke(app, ["import", "medm-vl", str(src), "--out", str(tmp_path / "run"), "--num-slices", "4",
                                 "--slice-pooling", "mean"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert (run / "FINISHED").is_file() and (run / "recipe.yaml").is_file()
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["image"] is None
    encoder, connector = (config["image3d"][k] for k in ("encoder", "connector"))
    processor_config = json.loads((run / "model" / "processor_config.json").read_text())
    volume = processor_config["volume"]
    assert (encoder["type"], encoder["base"], encoder["num_slices"], encoder["select_layer"]) == ("slices", "siglip", 4, -1)
    assert connector == {"type": "attention_pooling", "num_queries": 4, "heads": 8, "depth": 2, "activation": "gelu",
                         "slice_mean": True}
    assert (volume["size"], volume["window"], volume["crop_foreground"]) == ([4, 16, 16], [-1000.0, 1000.0], True)
    assert processor_config["template"] == "medmvl-qwen2"

    hu, u8 = hu_volume()
    np.save(tmp_path / "ct.npy", hu)
    from medmvl_cli.inference.generate import Predictor

    predictor = Predictor(run / "model")
    volumes = predictor.processor.volumes([tmp_path / "ct.npy"])  # our preprocessing of the HU file
    assert torch.allclose(volumes[0, 0], torch.from_numpy(u8).float() / 255, atol=1e-5)
    ours = our_logits(run / "model", [{"role": "user", "content": QUESTION_3D}], volumes=volumes)
    reference = ct_reference_logits(parts, u8)
    vocab = len(parts["tokenizer"])
    assert ours.shape[0] == reference.shape[0]
    assert ours.shape[1] == vocab + 2  # <image> and <image3d> added, the embeddings grew
    assert torch.allclose(ours[:, :vocab], reference, atol=1e-4), (ours[:, :vocab] - reference).abs().max()
    # The new rows never win a greedy step.
    assert (ours[:, vocab:].max(dim=1).values < ours[:, :vocab].max(dim=1).values).all()

    recipe = (run / "recipe.yaml").read_text()
    assert "imported by `medmvl import medm-vl`" in recipe and "averaged over slices" in recipe
    from medmvl_cli.config.loader import load_recipe

    loaded = load_recipe(run / "recipe.yaml")
    assert loaded.model.image3d.connector.slice_mean and loaded.model.llm.template == "medmvl-qwen2"

    answer = runner.invoke(app, ["infer", "--model", str(run), "--volume", str(tmp_path / "ct.npy"),
                                 "--prompt", "Is there a nodule?", "--max-new-tokens", "3"])
    assert answer.exit_code == 0, answer.output


def test_the_mean_over_slices_matters(ct_chest, tmp_path):
    """Concatenating the slices' tokens (medmvl's plain `slices`) is not what MedM-VL computes."""
    root, src, parts = ct_chest
    run = import_medm_vl(src, tmp_path / "run", num_slices=SLICES, slice_pooling="mean")
    model = load_model(run / "model").eval()
    _, u8 = hu_volume(1)
    volumes = torch.from_numpy(u8).float()[None, None] / 255
    from medmvl_cli.model.connectors import build_connector

    spec = {k: v for k, v in model.config.image3d["connector"].items() if k != "slice_mean"}
    plain = build_connector(spec, model.image3d_encoder.layout, 32, 64)
    plain.load_state_dict(model.image3d_connector.state_dict())
    with torch.no_grad():
        averaged = model.encode_volumes(volumes)
        features = model.image3d_encoder(volumes)  # (1, D * 4, 32): the slices' tokens one after another
        per_slice = torch.stack([plain(features[:, i * 4:(i + 1) * 4]) for i in range(SLICES)])
        pooled_together = plain(features)
    assert torch.allclose(averaged, per_slice.mean(dim=0), atol=1e-6)
    assert (averaged - pooled_together).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- 2D, tied, old format
def test_clip_mlp_checkpoint_in_the_older_format_with_nested_configs(tmp_path):
    """Unprefixed fields and nested sub-configs (older MedM-VL), a tied LLM with room in its
    vocabulary, CLIP `patch` at layer -2, and no tokenizer in the folder (--tokenizer)."""
    from PIL import Image

    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    llm = make_llm(tmp_path / "qwen", vocab=len(tokenizer) + 6, tied=True)
    tower, processor = make_vision(tmp_path / "clip", "clip")
    state = llm_state(llm, tied=True)
    state.update({f"encoder_image.encoder.vision_model.{k}": v for k, v in tower.state_dict().items()})
    head = mlp(state, "connector_image.", 32, 64)
    config = {"model_type": "lvlm", "llm_type": "qwen2", "llm_name_or_path": "Qwen/not-here", "llm_max_length": 256,
              "encoder_image_type": "clip", "encoder_image_name_or_path": "openai/not-here",
              "encoder_image_select_layer": -2, "encoder_image_select_feature": "patch",
              "connector_image_type": "mlp", "connector_image_name": "mlp2x_gelu",
              "llm_config": json.loads((tmp_path / "qwen" / "config.json").read_text()),
              "encoder_image_config": json.loads((tmp_path / "clip" / "config.json").read_text())}
    src = write_checkpoint(tmp_path / "MedM-VL-2D", config, state)
    run = import_medm_vl(src, tmp_path / "run", tokenizer_dir=tmp_path / "tokenizer", image_encoder_dir=tmp_path / "clip")
    model_cfg = json.loads((run / "model" / "config.json").read_text())
    assert model_cfg["image3d"] is None and model_cfg["image"]["connector"] == {"type": "mlp", "depth": 2, "activation": "gelu"}
    assert model_cfg["text_config"]["vocab_size"] == len(tokenizer) + 6  # the placeholders fit: no growth
    assert model_cfg["text_config"]["rope_parameters"]["rope_theta"] == 1e6
    assert json.loads((run / "model" / "processor_config.json").read_text())["max_length"] == 256
    assert not (run / "model" / "llm_adapter").exists()

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8))
    (tmp_path / "x.png").parent.mkdir(exist_ok=True)
    picture.save(tmp_path / "x.png")
    question = "<image>\nDescribe the findings."
    from medmvl_cli.inference.generate import Predictor

    predictor = Predictor(run / "model")
    pixels = predictor.processor.images([tmp_path / "x.png"])
    reference_pixels = processor(images=Image.open(tmp_path / "x.png").convert("RGB"), return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, reference_pixels)  # the encoder folder's processor came along (--image-encoder)
    ours = our_logits(run / "model", [{"role": "user", "content": question}], pixel_values=pixels)
    with torch.no_grad():
        features = head(tower(reference_pixels, output_hidden_states=True).hidden_states[-2][:, 1:])[0]
        reference = llm(inputs_embeds=medmvl_prompt_embeds(llm, tokenizer, question, "<image>", features)).logits[0]
    assert torch.allclose(ours[:, : reference.shape[1]], reference, atol=1e-4)
    # An imported 2D MedM-VL model is LLaVA: it exports to transformers' LLaVA with the same logits.
    from transformers import LlavaForConditionalGeneration

    from medmvl_cli.interop.export_hf import export_hf_llava

    llava, info = LlavaForConditionalGeneration.from_pretrained(export_hf_llava(run / "model", tmp_path / "llava"),
                                                               output_loading_info=True)
    assert not any(info.values()), info
    ids = predictor.prompt_ids([{"role": "user", "content": question}])
    with torch.no_grad():
        theirs = llava.eval()(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
    assert torch.allclose(theirs, ours, atol=1e-4)


# ---------------------------------------------------------------------------------- M3D-CLIP
def test_m3dclip_select_layer_counts_blocks_from_one(tmp_path):
    """M3D-CLIP's ViT lists block outputs only: MedM-VL's select_layer 0 is block 1's output, i.e.
    medmvl's 1. Spatial pooling 2x2x2 (MedM-VL's fixed size), patch tokens, text tower dropped."""
    from monai.networks.nets import ViT

    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    llm = make_llm(tmp_path / "qwen", vocab=len(tokenizer) + 2, tied=False)
    torch.manual_seed(4)
    vit = ViT(in_channels=1, img_size=(8, 16, 16), patch_size=(4, 8, 8), hidden_size=32, mlp_dim=64, num_layers=2,
              num_heads=4, proj_type="perceptron", classification=True, qkv_bias=False, spatial_dims=3).eval()
    with torch.no_grad():
        vit.cls_token.normal_()
    vision = {k: v for k, v in vit.state_dict().items() if "norm_cross_attn" not in k and "classification_head" not in k}
    state = llm_state(llm, tied=False)
    state.update({f"encoder_image3d.encoder.vision_encoder.{k}": v for k, v in vision.items()})
    state.update({"encoder_image3d.encoder.language_encoder.embeddings.word_embeddings.weight": torch.zeros(5, 8),
                  "encoder_image3d.encoder.mm_vision_proj.weight": torch.zeros(8, 32),
                  "encoder_image3d.encoder.logit_scale": torch.ones(())})
    head = mlp(state, "connector_image3d.", 32, 64)
    (tmp_path / "m3d").mkdir()
    (tmp_path / "m3d" / "config.json").write_text(json.dumps({
        "img_size": [8, 16, 16], "patch_size": [4, 8, 8], "hidden_size": 32, "mlp_dim": 64, "num_layers": 2,
        "num_heads": 4, "in_channels": 1, "pos_embed": "perceptron"}))
    config = lvlm_config(llm_name_or_path=str(tmp_path / "qwen"), encoder_image3d_type="m3dclip",
                         encoder_image3d_name_or_path=str(tmp_path / "m3d"), encoder_image3d_select_layer=0,
                         encoder_image3d_select_feature="patch", connector_image3d_type="spatial_pooling",
                         connector_image3d_name="mlp2x_gelu")
    src = write_checkpoint(tmp_path / "MedM-VL-CT-m3d", config, state, tokenizer)
    run = import_medm_vl(src, tmp_path / "run")
    settings = json.loads((run / "model" / "config.json").read_text())["image3d"]
    assert settings["encoder"]["type"] == "m3d_clip" and settings["encoder"]["select_layer"] == 1
    assert settings["connector"] == {"type": "spatial_pooling", "pool": 2, "depth": 2, "activation": "gelu"}
    assert "select_layer 0" in (run / "recipe.yaml").read_text()

    volume = torch.rand(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    ours = our_logits(run / "model", [{"role": "user", "content": QUESTION_3D}], volumes=volume)
    with torch.no_grad():
        _, hidden = vit(volume)
        tokens = hidden[0][:, 1:]  # MedM-VL: features[select_layer] with select_layer 0, `patch`
        cube = tokens.transpose(1, 2).reshape(1, 32, 2, 2, 2)
        pooled = nn.functional.avg_pool3d(cube, kernel_size=2, stride=2).flatten(2).transpose(1, 2)
        features = head(pooled)[0]
        reference = llm(inputs_embeds=medmvl_prompt_embeds(llm, tokenizer, QUESTION_3D, "<image3d>", features)).logits[0]
    assert torch.allclose(ours[:, : reference.shape[1]], reference, atol=1e-4)


# ---------------------------------------------------------------------------------- errors
def broken_copy(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    edit(state, config)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(state, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda s, c: s.pop("connector_image.connector.2.bias"), "missing: image3d_connector.mlp.2.bias"),
    (lambda s, c: s.update({"connector_image.extra.weight": torch.zeros(2)}), "unexpected: connector_image.extra.weight"),
    (lambda s, c: s.update({"vision_tower.stray": torch.zeros(2)}), "unexpected: vision_tower.stray"),
    (lambda s, c: s.pop("llm.lm_head.weight"), "tie_word_embeddings: false"),
    (lambda s, c: s.update({"llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2)}),
     "unmerged LoRA adapter"),
    (lambda s, c: c.update(model_type="llava"), "not MedM-VL's 'lvlm'"),
    (lambda s, c: c.pop("model_type"), "nor the release-day layout"),  # no model_type, yet lvlm_ fields
    (lambda s, c: c.update(lvlm_connector_image_name="linear"), "mlp<depth>x_gelu"),
    (lambda s, c: c.update(lvlm_connector_image_name="mlp1x_gelu"),
     "unexpected: connector_image.connector.2.bias (as image3d_connector.mlp.2.bias)"),
    (lambda s, c: s.update({"llm.model.norm.weight": torch.ones(3)}), "shape mismatch: llm.model.norm.weight (3,)"),
    (lambda s, c: c.update(lvlm_llm_type="llama"), "--template"),
    (lambda s, c: c.update(lvlm_encoder_image_select_feature="patch"), "--allow-approximate"),
    (lambda s, c: c.update(lvlm_llm_name_or_path="Qwen/Qwen2.5-3B-Instruct"), "--llm DIR"),
    (lambda s, c: c.update(lvlm_encoder_image_name_or_path="google/siglip"), "--image-encoder DIR"),
])
def test_problems_are_errors_that_name_them(ct_chest, tmp_path, edit, message):
    _, src, _ = ct_chest
    bad = broken_copy(src, tmp_path / "bad", edit)
    result = runner.invoke(app, ["import", "medm-vl", str(bad), "--out", str(tmp_path / "run"), "--num-slices", "4"])
    assert result.exit_code == 1, result.output
    assert message in flat(result.output), flat(result.output)
    assert not (tmp_path / "run").exists()


def test_siglip_patch_imports_with_allow_approximate_and_says_so(ct_chest, tmp_path):
    _, src, _ = ct_chest
    bad = broken_copy(src, tmp_path / "patch", lambda s, c: c.update(lvlm_encoder_image_select_feature="patch"))
    run = import_medm_vl(bad, tmp_path / "run", num_slices=SLICES, allow_approximate=True)
    assert "--allow-approximate" in (run / "recipe.yaml").read_text()


def test_options_paths_and_out_folder(ct_chest, tmp_path):
    root, src, parts = ct_chest
    # Parts not local: given by --llm / --image-encoder / --tokenizer instead.
    moved = broken_copy(src, tmp_path / "moved", lambda s, c: c.update(
        lvlm_llm_name_or_path="Qwen/Qwen2.5-3B-Instruct", lvlm_encoder_image_name_or_path="google/siglip"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (moved / name).unlink()
    result = runner.invoke(app, [
        "import", "medm-vl", str(moved), "--out", str(tmp_path / "run"), "--num-slices", "4", "--llm", str(root / "qwen"),
        "--image-encoder", str(root / "siglip"), "--tokenizer", str(root / "tokenizer"), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    recipe = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "path: Qwen/Qwen2.5-3B-Instruct" in recipe  # where MedM-VL took its LLM from
    # --as both: the same SigLIP and connector also answer 2D images (MedM-VL feeds both).
    both = import_medm_vl(src, tmp_path / "both", branch="both", num_slices=SLICES)
    config = json.loads((both / "model" / "config.json").read_text())
    assert config["image"]["encoder"]["type"] == "siglip" and config["image3d"]["encoder"]["type"] == "slices"
    assert "slice_mean" not in config["image"]["connector"]
    assert (both / "model" / "preprocessor_config.json").is_file()
    # A non-empty --out is refused; --overwrite replaces only a run folder.
    refused = runner.invoke(app, ["import", "medm-vl", str(src), "--out", str(both), "--num-slices", "4"])
    assert refused.exit_code == 1 and "--overwrite" in flat(refused.output)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("keep")
    with pytest.raises(RunError, match="has no medmvl-run.json"):
        import_medm_vl(src, other, num_slices=SLICES, overwrite=True)
    assert (other / "a.txt").read_text() == "keep"
    import_medm_vl(src, both, num_slices=SLICES, overwrite=True)
    assert json.loads((both / "medmvl-run.json").read_text())["format"] == "medmvl-run"
    assert json.loads((both / "model" / "config.json").read_text())["image"] is None
    with pytest.raises(ModelError, match="has its own 3D encoder"):
        broken = broken_copy(src, tmp_path / "two", lambda s, c: c.update(lvlm_encoder_image3d_type="m3dclip"))
        import_medm_vl(broken, tmp_path / "x", branch="slices")


def test_slice_mean_needs_the_grid_of_a_slices_encoder():
    from medmvl_cli.model.connectors import build_connector
    from medmvl_cli.model.encoders.base import TokenLayout

    spec = {"type": "mlp", "depth": 2, "activation": "gelu", "slice_mean": True}
    with pytest.raises(ModelError, match="slice_mean needs the"):
        build_connector(spec, TokenLayout((4, 4)), 32, 64)  # a 2D image grid
    with pytest.raises(ModelError, match="1 CLS"):
        build_connector(spec, TokenLayout((2, 4, 4), 1), 32, 64)  # a 3D ViT: one CLS for the whole volume
    connector = build_connector(spec, TokenLayout((3, 2, 2), 3), 32, 64)  # slices of CLIP with cls_patch
    x = torch.randn(2, 3 * 5, 32)
    with torch.no_grad():
        out = connector(x)
        expected = torch.stack([connector.mlp(x[:, i * 5:(i + 1) * 5]) for i in range(3)]).mean(dim=0)
    assert connector.num_tokens == 5 and torch.allclose(out, expected, atol=1e-6)
