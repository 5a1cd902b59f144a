"""The assembled model on tiny presets: merging, mixed batches, generation, save / load, LoRA,
trainable components, gradient checkpointing, dtype and attention choices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from medmvl_cli.config.loader import load_recipe
from medmvl_cli.errors import ModelError
from medmvl_cli.inference.load import build, load
from medmvl_cli.model.builder import load_model, save_model
from medmvl_cli.model.llm import resolve_dtype
from medmvl_cli.model.trainable import apply_lora, apply_trainable, parameter_counts

BOTH = """
model:
  llm: {{preset: {llm}, max_length: 512, attn_implementation: {attn}}}
  image:
    encoder: {{type: clip, preset: tiny}}
    connector: {{type: mlp, depth: 2}}
  image3d:
    encoder: {{type: vit3d, preset: tiny}}
    connector: {{type: spatial_pooling, pool: 2}}
    volume: {{size: [8, 32, 32]}}
"""


def make(folder: Path, text: str, *overrides: str):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(text)
    torch.manual_seed(0)
    model, processor = build(load_recipe(path, overrides))
    return model.eval(), processor.tokenizer, processor


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    return make(tmp_path_factory.mktemp("both"), BOTH.format(llm="tiny-qwen2", attn="sdpa"))


def ids_for(model, parts: list, seed: int = 0) -> list[int]:
    """Token ids from parts: an int = that many random text tokens, "I" / "V" = an expanded
    `<image>` / `<image3d>` placeholder."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for part in parts:
        if part == "I":
            out += [model.config.image_token_id] * model.num_tokens("image")
        elif part == "V":
            out += [model.config.image3d_token_id] * model.num_tokens("image3d")
        else:
            out += torch.randint(10, 2000, (part,), generator=gen).tolist()
    return out


def right_pad(rows: list[list[int]], pad: int):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def left_pad(rows: list[list[int]], pad: int):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


# ------------------------------------------------------------------------------ LLMs
@pytest.mark.parametrize("llm", ["tiny-qwen2", "tiny-llama", "tiny-phi", "tiny-phi3"])
def test_every_llm_preset_builds_and_runs(tmp_path, llm):
    model, tokenizer, processor = make(tmp_path, BOTH.format(llm=llm, attn="sdpa"))
    assert model.config.text_config.model_type == {"tiny-qwen2": "qwen2", "tiny-llama": "llama", "tiny-phi": "phi", "tiny-phi3": "phi3"}[llm]
    assert model.num_tokens("image") == 16 and model.num_tokens("image3d") == 4
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert tokenizer("<image3d>", add_special_tokens=False)["input_ids"] == [model.config.image3d_token_id]
    assert processor is not None and list(processor.image_processor.image_mean) == model.config.image["encoder"]["image_mean"]
    ids = torch.tensor([ids_for(model, [3, "I", 2, "V", 4])])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), volumes=torch.rand(1, 1, 8, 32, 32))
    assert out.logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert list(model.components()) == ["llm", "image_encoder", "image_connector", "image3d_encoder", "image3d_connector"]


def test_mismatched_placeholders_and_features_is_an_error(both):
    model, _, _ = both
    ids = torch.tensor([ids_for(model, [3, "I", 2])])
    with pytest.raises(ModelError, match=r"16 <image> tokens in input_ids but 2 images give 32 feature tokens"):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ModelError, match=r"16 <image> tokens in input_ids but 0 images give 0"):
        model(input_ids=ids)
    short = torch.tensor([ids_for(model, [3, "V"])[:-1]])
    with pytest.raises(ModelError, match=r"3 <image3d> tokens in input_ids but 1 volumes give 4 feature tokens"):
        model(input_ids=short, volumes=torch.rand(1, 1, 8, 32, 32))


def test_mixed_modality_batch_equals_each_sample_alone(both):
    model, tokenizer, _ = both
    samples = [  # (parts, number of images, number of volumes)
        ([4, "I", 6], 1, 0),
        ([2, "V", 9], 0, 1),
        ([1, "I", 2, "V", 3, "I", 2], 2, 1),
        ([7], 0, 0),
        (["I", 1, "I", 5], 2, 0),
    ]
    torch.manual_seed(1)
    images = [torch.randn(n, 3, 32, 32) for _, n, _ in samples]
    volumes = [torch.rand(n, 1, 8, 32, 32) for _, _, n in samples]
    rows = [ids_for(model, parts, seed=i) for i, (parts, _, _) in enumerate(samples)]
    ids, mask = right_pad(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(images), volumes=torch.cat(volumes)).logits
        for i, row in enumerate(rows):
            alone = model(
                input_ids=torch.tensor([row]),
                pixel_values=images[i] if len(images[i]) else None,
                volumes=volumes[i] if len(volumes[i]) else None,
            ).logits
            assert torch.allclose(batch[i, : len(row)], alone[0], atol=1e-5), f"sample {i}"


def test_packed_rows_equal_each_sample_alone(both):
    model, _, _ = both
    rows = [ids_for(model, [3, "I", 4], seed=3), ids_for(model, [2, "V", 1, "I", 2], seed=4)]
    images, volume = torch.randn(2, 3, 32, 32), torch.rand(1, 1, 8, 32, 32)
    packed = torch.tensor([rows[0] + rows[1]])
    positions = torch.tensor([list(range(len(rows[0]))) + list(range(len(rows[1])))])
    with torch.no_grad():
        logits = model(input_ids=packed, position_ids=positions, pixel_values=images, volumes=volume).logits
        first = model(input_ids=torch.tensor([rows[0]]), pixel_values=images[:1]).logits
        second = model(input_ids=torch.tensor([rows[1]]), pixel_values=images[1:], volumes=volume).logits
    assert torch.allclose(logits[0, : len(rows[0])], first[0], atol=1e-5)
    assert torch.allclose(logits[0, len(rows[0]):], second[0], atol=1e-5)


def test_labels_at_placeholders_never_count(both):
    model, _, _ = both
    ids = torch.tensor([ids_for(model, [3, "I", 5])])
    pixels = torch.randn(1, 3, 32, 32)
    labels = ids.clone()  # placeholders included: they must be ignored
    out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    logits = out.logits[0, :-1]
    target = ids[0, 1:].clone()
    target[target == model.config.image_token_id] = -100
    expected = nn.functional.cross_entropy(logits, target, ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_precomputed_features_give_the_same_logits(both):
    model, _, _ = both
    ids = torch.tensor([ids_for(model, [2, "V", 3, "I", 1])])
    pixels, volume = torch.randn(1, 3, 32, 32), torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        direct = model(input_ids=ids, pixel_values=pixels, volumes=volume).logits
        embeds = model(input_ids=ids, image_embeds=model.encode_images(pixels), volume_embeds=model.encode_volumes(volume)).logits
        assert model.encode_volumes(volume).shape == (1, 4, 64)
    assert torch.equal(direct, embeds)


def test_media_for_an_absent_branch_is_an_error(tmp_path):
    text = BOTH.format(llm="tiny-qwen2", attn="sdpa").split("  image3d:")[0]
    model, _, _ = make(tmp_path, text)
    assert list(model.components()) == ["llm", "image_encoder", "image_connector"]
    with pytest.raises(ModelError, match="no 3D"):
        model.encode_volumes(torch.rand(1, 1, 8, 32, 32))
    with pytest.raises(ModelError, match="has no image3d branch"):
        model(input_ids=torch.tensor([[5, 6]]), volumes=torch.rand(1, 1, 8, 32, 32))


# ------------------------------------------------------------------------------ generation
def test_left_padded_greedy_batch_equals_each_prompt_alone(both):
    model, tokenizer, _ = both
    rows = [ids_for(model, [3, "I", 4], seed=5), ids_for(model, [1, "V", 2, "I", 9], seed=6)]
    images = [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)]
    volume = torch.rand(1, 1, 8, 32, 32)
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch = model.generate(ids, attention_mask=mask, pixel_values=torch.cat(images), volumes=volume, **settings)
    assert batch.shape == (2, 6)  # the new tokens only
    first = model.generate(torch.tensor([rows[0]]), pixel_values=images[0], **settings)
    second = model.generate(torch.tensor([rows[1]]), pixel_values=images[1], volumes=volume, **settings)
    assert torch.equal(batch[0], first[0])
    assert torch.equal(batch[1], second[0])
    # Greedy decoding by hand: the first new token is the argmax after the prompt.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([rows[0]]), pixel_values=images[0]).logits
    assert first[0, 0] == logits[0, -1].argmax()


def test_sampling_beam_search_and_reused_features(both):
    model, tokenizer, _ = both
    ids = torch.tensor([ids_for(model, [2, "I", 3], seed=9)])
    pixels = torch.randn(1, 3, 32, 32)
    common = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    sampled = model.generate(ids, pixel_values=pixels, do_sample=True, temperature=0.8, top_p=0.9, **common)
    beams = model.generate(ids, pixel_values=pixels, num_beams=3, do_sample=False, **common)
    assert sampled.shape == beams.shape == (1, 4)
    greedy = model.generate(ids, pixel_values=pixels, do_sample=False, **common)
    reused = model.generate(ids, image_embeds=model.encode_images(pixels), do_sample=False, **common)
    assert torch.equal(greedy, reused)


# ------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_needs_no_original_folders(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDMVL_CACHE", str(cache))
    model, tokenizer, processor = make(tmp_path / "recipe", BOTH.format(llm="tiny-llama", attn="sdpa"))
    ids = torch.tensor([ids_for(model, [3, "I", 2, "V", 4])])
    pixels, volume = torch.randn(1, 3, 32, 32), torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels, volumes=volume).logits
    folder = save_model(model, tmp_path / "run" / "model", processor, max_shard_size="300KB")
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json",
            "processor_config.json"} <= set(names)
    config = json.loads((folder / "config.json").read_text())
    assert "template" not in config and "volume" not in config["image3d"]  # the config is the architecture
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["volume"]["size"] == [8, 32, 32] and saved["template"] == "llama3"
    assert saved["tokens"] == {"<image>": 16, "<image3d>": 4}
    assert str(cache) not in (folder / "config.json").read_text()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in folder.rglob("*"))

    shutil.move(str(cache), str(tmp_path / "cache-gone"))
    loaded, processor2 = load(folder, dtype="float32", device=None)
    tokenizer2 = processor2.tokenizer
    assert not cache.exists()
    with torch.no_grad():
        after = loaded.eval()(input_ids=ids, pixel_values=pixels, volumes=volume).logits
    assert torch.equal(before, after)
    assert tokenizer2.convert_tokens_to_ids("<image>") == loaded.config.image_token_id
    assert tokenizer2.chat_template == tokenizer.chat_template
    assert list(processor2.image_processor.image_mean) == list(processor.image_processor.image_mean)
    assert loaded.num_tokens("image") == 16 and loaded.num_tokens("image3d") == 4


def test_save_in_another_dtype_from_a_given_state_dict(tmp_path, both):
    model, tokenizer, processor = both
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folder = save_model(model, tmp_path / "m", processor, state_dict=state, dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = load_model(folder, dtype="float32")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key].to(torch.bfloat16).float()), key


def test_branch_settings_for_the_data_side(both, tmp_path):
    model, _, processor = both
    assert model.image3d_encoder is not None and processor.image_window is None
    assert tuple(processor.volume.size) == (8, 32, 32) and processor.volume.window == (-1000.0, 1000.0)
    text = BOTH.format(llm="tiny-qwen2", attn="sdpa").split("  image3d:")[0].replace(
        "connector: {type: mlp, depth: 2}", "connector: {type: mlp, depth: 2}\n    window: [-160, 240]")
    only_2d, _, processor_2d = make(tmp_path, text)
    assert only_2d.image3d_encoder is None and processor_2d.volume is None
    assert processor_2d.image_window == (-160.0, 240.0)


def test_lora_saves_base_weights_and_adapter_and_loads_wrapped(tmp_path, both):
    model, tokenizer, processor = make(tmp_path / "r", BOTH.format(llm="tiny-qwen2", attn="sdpa"))
    linear = {n for n, m in model.llm.named_modules() if isinstance(m, nn.Linear)}
    apply_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    wrapped = {n for n, m in model.llm.get_base_model().named_modules() if hasattr(m, "lora_A")}
    assert "lm_head" in linear and len(linear) == 15  # 2 layers x 7 projections + the head
    assert wrapped == linear - {"lm_head"}
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    ids = torch.tensor([ids_for(model, [3, "I", 2, "V", 4])])
    pixels, volume = torch.randn(1, 3, 32, 32), torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels, volumes=volume).logits
    folder = save_model(model, tmp_path / "model", processor)
    assert (folder / "llm_adapter" / "adapter_config.json").is_file()
    assert (folder / "llm_adapter" / "adapter_model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("lora_" in k or "base_layer" in k or "base_model" in k for k in keys)
    assert "llm.model.layers.0.self_attn.q_proj.weight" in keys

    loaded = load_model(folder, dtype="float32")
    assert type(loaded.llm).__name__ == "PeftModelForCausalLM"
    assert not any(p.requires_grad for n, p in loaded.llm.named_parameters() if "lora_" in n)
    with torch.no_grad():
        after = loaded.eval()(input_ids=ids, pixel_values=pixels, volumes=volume).logits
        plain = both[0]  # a different random model; the adapter's own effect is checked below
        merged = loaded.llm.merge_and_unload()
        loaded.llm = merged
        merged_logits = loaded(input_ids=ids, pixel_values=pixels, volumes=volume).logits
    assert torch.allclose(before, after, atol=1e-6)
    assert torch.allclose(before, merged_logits, atol=1e-4) and plain is not loaded
    trainable = load_model(folder, dtype="float32", adapter_trainable=True)
    assert any(p.requires_grad for n, p in trainable.llm.named_parameters() if "lora_" in n)
    merged_on_load = load_model(folder, dtype="float32", merge_lora=True)
    assert type(merged_on_load.llm).__name__ != "PeftModelForCausalLM" and merged_on_load.config.llm_adapter is None
    with torch.no_grad():
        assert torch.allclose(merged_on_load.eval()(input_ids=ids, pixel_values=pixels, volumes=volume).logits, before, atol=1e-4)


# ------------------------------------------------------------------------------ trainable
def test_apply_trainable_and_parameter_counts(tmp_path):
    model, _, _ = make(tmp_path, BOTH.format(llm="tiny-qwen2", attn="sdpa"))
    apply_trainable(model, {"llm": "frozen", "image_encoder": "frozen", "image_connector": "full",
                            "image3d_encoder": "full", "image3d_connector": "frozen"})
    counts = parameter_counts(model)
    assert counts["llm"][1] == 0 and counts["image_encoder"][1] == 0 and counts["image3d_connector"][1] == 0
    assert counts["image_connector"][0] == counts["image_connector"][1] == 64 * 64 * 2 + 64 * 2
    assert counts["image3d_encoder"][1] == counts["image3d_encoder"][0] > 0
    embed = model.llm.get_input_embeddings().weight.numel()
    llm_params = sum(p.numel() for p in model.llm.parameters())  # tied embeddings counted once
    assert counts["llm"][0] == llm_params and llm_params < embed * 2 + 2e5
    apply_trainable(model, {"llm": "full"})
    apply_trainable(model, {"llm": "lora"})  # before apply_lora: the LLM freezes ...
    assert parameter_counts(model)["llm"][1] == 0
    apply_lora(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad]  # ... and the adapter trains
    assert trainable and all("lora_" in n for n in trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    assert parameter_counts(model)["llm"][1] == sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    apply_trainable(model, {"llm": "lora", "image_connector": "frozen"})  # after: the same
    assert [n for n, p in model.llm.named_parameters() if p.requires_grad] == trainable
    with pytest.raises(ModelError, match="carries a LoRA adapter"):
        apply_trainable(model, {"llm": "full"})


def test_trainable_for_an_absent_branch_is_an_error(tmp_path):
    model, _, _ = make(tmp_path, BOTH.format(llm="tiny-qwen2", attn="sdpa").split("  image3d:")[0])
    with pytest.raises(ModelError, match="has no image3d branch"):
        apply_trainable(model, {"image3d_encoder": "full"})


def test_gradient_checkpointing_gives_the_same_gradients(both):
    model, _, _ = both
    model.requires_grad_(True)
    ids = torch.tensor([ids_for(model, [3, "I", 2, "V", 4])] * 2)
    pixels, volumes = torch.randn(2, 3, 32, 32), torch.rand(2, 1, 8, 32, 32)

    def grads():
        model.zero_grad()
        loss = model(input_ids=ids, pixel_values=pixels, volumes=volumes, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    loss, plain = grads()
    model.gradient_checkpointing_enable()
    try:
        assert model.image3d_encoder.vit.gradient_checkpointing
        assert model.image_encoder.tower.encoder.layers[0].gradient_checkpointing
        loss2, checked = grads()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        model.zero_grad()
    assert torch.allclose(loss, loss2, atol=1e-6)
    assert set(plain) == set(checked) and any(n.startswith("image3d_encoder") for n in plain)
    for name in plain:
        assert torch.allclose(plain[name], checked[name], atol=1e-5), name


# ------------------------------------------------------------------------------ builder
def test_dtype_and_attention_choices(tmp_path):
    assert resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32)
    with pytest.raises(ModelError, match=r"flash-attn.*\n.*gpu"):
        make(tmp_path / "fa", BOTH.format(llm="tiny-qwen2", attn="flash_attention_2"))
    sdpa, _, _ = make(tmp_path / "sdpa", BOTH.format(llm="tiny-qwen2", attn="sdpa"))
    eager, _, _ = make(tmp_path / "eager", BOTH.format(llm="tiny-qwen2", attn="eager"))
    assert eager.llm.config._attn_implementation == "eager" and sdpa.llm.config._attn_implementation == "sdpa"
    ids = torch.tensor([ids_for(sdpa, [3, "I", 2, "V", 4])])
    pixels, volume = torch.randn(1, 3, 32, 32), torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        a = sdpa(input_ids=ids, pixel_values=pixels, volumes=volume).logits
        b = eager(input_ids=ids, pixel_values=pixels, volumes=volume).logits
    assert torch.allclose(a, b, atol=1e-5)


def _llm_folder_without_placeholders(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "</s>"] + [f"w{i}" for i in range(40)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_builder_adds_placeholder_tokens_to_a_real_llm(tmp_path):
    folder = _llm_folder_without_placeholders(tmp_path / "llm")
    text = f"""
model:
  llm: {{path: {folder}, template: plain}}
  image:
    encoder: {{type: siglip, preset: tiny}}
    connector: {{type: attention_pooling, num_queries: 5, heads: 4}}
"""
    model, tokenizer, _ = make(tmp_path / "r", text)
    assert len(tokenizer) == 43 + 2
    assert model.llm.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id and image_id >= 43
    assert tokenizer("w1 <image> w2", add_special_tokens=False)["input_ids"][1] == image_id
    ids = torch.tensor([[5, 6] + [image_id] * model.num_tokens("image") + [7]])
    assert model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_init_from_an_earlier_run(tmp_path, both):
    model, tokenizer, processor = both
    save_model(model, tmp_path / "earlier" / "model", processor)
    recipe = BOTH.format(llm="tiny-qwen2", attn="sdpa") + f"init_from: {tmp_path / 'earlier'}\n"
    again, _, _ = make(tmp_path / "r", recipe)
    ids = torch.tensor([ids_for(model, [3, "I", 2, "V", 4])])
    pixels, volume = torch.randn(1, 3, 32, 32), torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels, volumes=volume).logits,
                           again(input_ids=ids, pixel_values=pixels, volumes=volume).logits)
    other = recipe.replace("type: spatial_pooling, pool: 2", "type: mlp")
    with pytest.raises(ModelError, match="connector.type is 'mlp' but the earlier model has 'spatial_pooling'"):
        make(tmp_path / "r2", other)


def test_random_vit3d_blocks_keep_the_patch_signal(both):
    """The random 3D ViT gets the ViT init (linear N(0, 0.02)), the connectors PyTorch's fan-in one;
    so at init the last block's output is still mostly the per-patch embedding, not one vector
    common to all tokens (which left the default last-layer features unreadable)."""
    model = both[0]
    vit, connector = model.image3d_encoder.vit, model.image3d_connector
    assert abs(vit.blocks[0].mlp.linear1.weight.std().item() - 0.02) < 0.002
    assert connector.mlp[0].weight.std().item() > 0.05  # fan-in: 1 / sqrt(3 * 64) ~ 0.072
    volumes = torch.rand(2, 1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = model.image3d_encoder.normalize(volumes)
        first, last = vit.hidden_states(x, 0)[:, 1:], vit.hidden_states(x, len(vit.blocks))[:, 1:]
    spread = lambda h: (h - h.mean(dim=1, keepdim=True)).pow(2).mean().sqrt()  # noqa: E731
    assert spread(last) / last.pow(2).mean().sqrt() > 0.9 * spread(first) / first.pow(2).mean().sqrt()
