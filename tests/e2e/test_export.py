"""`medmvl export`: medmvl folders (LoRA kept or merged), transformers' LLaVA (5.x and 4.x layouts),
refusals, atomic writes. The proof that hf-llava needs no medmvl code runs transformers in a
subprocess whose `sys.modules` never holds medmvl."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from medmvl_cli.config.loader import load_recipe
from medmvl_cli.engine.stages import train_stage
from medmvl_cli.errors import RunError
from medmvl_cli.inference.generate import GenerationSettings, Predictor
from medmvl_cli.inference.load import build, load
from medmvl_cli.model.builder import save_model
from tests.e2e.conftest import RECIPE_2D, RECIPE_3D

runner = CliRunner()


def flat(output: str) -> str:
    """CLI output without the error panel's frame and line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


PROMPT = "<image>\nWhich quadrant holds the bright spot?"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, synth_data) -> Path:
    """A tiny CLIP + MLP + Qwen2 LoRA run (a few steps, so the adapter is far from zero)."""
    folder = tmp_path_factory.mktemp("lora")
    recipe = folder / "tiny-2d.yaml"
    recipe.write_text(RECIPE_2D.format(data=synth_data))
    overrides = [f"output_dir={folder / 'runs' / 'lora'}", "stage=lora", "lora.r=4", "lora.alpha=8",
                 "lora.dropout=0.0", "train.max_steps=3", "train.lr=1.0e-2"]
    return train_stage(load_recipe(recipe, overrides), quiet=True)


def model_folder(tmp_path: Path, text: str, name: str = "model") -> Path:
    """An untrained model folder saved from a recipe text (random weights, seed 0)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text)
    torch.manual_seed(0)
    model, processor = build(load_recipe(recipe))
    return save_model(model, tmp_path / name, processor)


SIGLIP_LLAMA = """
model:
  llm: {preset: tiny-llama}
  image:
    encoder: {type: siglip, preset: tiny, select_layer: -2, select_feature: patch}
    connector: {type: mlp, depth: 2, activation: gelu}
"""


def sample_images(synth_data: Path) -> list[Path]:
    return sorted((synth_data / "images").glob("test-*.png"))[:3]


def logits_of(model, processor, image: Path) -> torch.Tensor:
    inputs = processor([{"role": "user", "content": PROMPT}], images=[image])
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0]


def answers(model_dir: Path, images: list[Path]) -> list[str]:
    from medmvl_cli.inference.generate import Request

    predictor = Predictor(model_dir)
    requests = [Request(messages=[{"role": "user", "content": PROMPT}], images=[i]) for i in images]
    return predictor.generate(requests, GenerationSettings(max_new_tokens=8))


# ------------------------------------------------------------------------------------ medmvl format
@pytest.mark.slow  # trains the LoRA run (module fixture), then loads the model seven times
def test_export_keeps_the_adapter_unless_merged_and_answers_stay_the_same(lora_run, synth_data, tmp_path):
    images = sample_images(synth_data)
    model, processor = load(lora_run / "model", merge_lora=False, device=None)
    with_adapter = [logits_of(model, processor, i) for i in images]
    with model.llm.disable_adapter():
        base = logits_of(model, processor, images[0])
    assert (base - with_adapter[0]).abs().max() > 1e-2  # the adapter matters, so the check below can fail

    kept = runner.invoke(app, ["export", "--model", str(lora_run), "--out", str(tmp_path / "kept")])
    assert kept.exit_code == 0, kept.output
    assert (tmp_path / "kept" / "llm_adapter" / "adapter_model.safetensors").is_file()

    merged = runner.invoke(app, ["export", "--model", str(lora_run), "--out", str(tmp_path / "merged"), "--merge-lora"])
    assert merged.exit_code == 0, merged.output
    out = tmp_path / "merged"
    assert not (out / "llm_adapter").exists()
    assert json.loads((out / "config.json").read_text())["llm_adapter"] is None
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k]
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (out / name).is_file(), name

    reference = answers(lora_run / "model", images)
    for folder in (tmp_path / "kept", out):
        loaded, proc = load(folder, merge_lora=False, device=None)
        for image, expected in zip(images, with_adapter):
            assert torch.allclose(logits_of(loaded, proc, image), expected, atol=1e-4)
        assert answers(folder, images) == reference
    infer = runner.invoke(app, ["infer", "--model", str(out), "--image", str(images[0]), "--max-new-tokens", "8"])
    assert infer.exit_code == 0, infer.output
    assert reference[0] in infer.stdout


def test_a_non_empty_out_is_refused_and_overwrite_replaces_only_exports(tmp_path):
    source = model_folder(tmp_path / "source", SIGLIP_LLAMA)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused = runner.invoke(app, ["export", "--model", str(source), "--out", str(out)])
    assert refused.exit_code == 1 and "not empty" in flat(refused.output) and "--overwrite" in flat(refused.output)
    forced = runner.invoke(app, ["export", "--model", str(source), "--out", str(out), "--overwrite"])
    assert forced.exit_code == 1 and "has no medmvl-export.json" in flat(forced.output)
    assert (out / "notes.txt").read_text() == "keep me"

    first = runner.invoke(app, ["export", "--model", str(source), "--out", str(tmp_path / "export"), "--dtype", "bfloat16"])
    assert first.exit_code == 0, first.output
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    again = runner.invoke(app, ["export", "--model", str(source), "--out", str(tmp_path / "export"), "--overwrite",
                                "--format", "hf-llava"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "llava"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out", "source"]  # no staging folders left


def test_a_failed_export_leaves_the_old_folder_and_no_staging(tmp_path, monkeypatch):
    from medmvl_cli.interop import export_native

    source = model_folder(tmp_path / "source", SIGLIP_LLAMA)
    out = tmp_path / "export"
    export_native.export_medmvl(source, out)
    before = sorted(p.name for p in out.iterdir())

    def broken(model, folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr("medmvl_cli.model.builder.save_model", broken)
    with pytest.raises(RunError, match=f"cannot write --out at {out} \\(disk full\\)"):
        export_native.export_medmvl(source, out, overwrite=True, dtype="bfloat16")
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "source"]


# ------------------------------------------------------------------------------------ hf-llava
TRANSFORMERS_SIDE = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

folder, prompt, max_new, images = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
processor = AutoProcessor.from_pretrained(folder)
model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
text = processor.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
results = []
for image in images:
    # The chat template already writes bos where the LLM wants one.
    inputs = processor(images=Image.open(image).convert("RGB"), text=text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        logits = model(**inputs).logits[0, -1]
    results.append({"prompt_ids": inputs["input_ids"][0].tolist(), "new_ids": out[0, inputs["input_ids"].shape[1]:].tolist(),
                    "last_logits": logits.tolist()})
loaded = sorted(m for m in sys.modules if m == "medmvl_cli" or m.startswith(("medmvl_cli.", "medmvl.")))
print(json.dumps({"results": results, "medmvl_modules": loaded}))
"""


def transformers_side(folder: Path, images: list[Path], max_new: int, cwd: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", TRANSFORMERS_SIDE, str(folder), PROMPT, str(max_new), *map(str, images)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def medmvl_side(model_dir: Path, image: Path, max_new: int) -> dict:
    predictor = Predictor(model_dir)
    messages = [{"role": "user", "content": PROMPT}]
    ids = predictor.prompt_ids(messages)
    pixels = predictor.processor.images([image])
    settings = GenerationSettings(max_new_tokens=max_new)
    tokenizer = predictor.tokenizer
    with torch.no_grad():
        new = predictor.model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), pixel_values=pixels,
            **settings.kwargs(tokenizer.pad_token_id, predictor.processor.template.stop_token_ids(tokenizer)))
        logits = predictor.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1]
    return {"prompt_ids": ids, "new_ids": new[0].tolist(), "last_logits": logits, "tokenizer": tokenizer}


@pytest.mark.slow  # trains the LoRA run (module fixture) and starts a second Python
def test_hf_llava_generates_what_medmvl_infer_does_without_medmvl_code(lora_run, synth_data, tmp_path):
    out = tmp_path / "llava"
    result = runner.invoke(app, ["export", "--model", str(lora_run), "--out", str(out), "--format", "hf-llava"])
    assert result.exit_code == 0, result.output
    images = sample_images(synth_data)[:2]
    theirs = transformers_side(out, images, 12, cwd=tmp_path)
    assert theirs["medmvl_modules"] == []
    for image, result in zip(images, theirs["results"]):
        ours = medmvl_side(lora_run / "model", image, 12)
        assert result["prompt_ids"] == ours["prompt_ids"]  # template, <image> expansion, tokenizer
        assert torch.allclose(torch.tensor(result["last_logits"]), ours["last_logits"], atol=1e-4)  # LoRA merged
        assert len(ours["new_ids"]) >= 4
        assert result["new_ids"] == ours["new_ids"]
    infer = runner.invoke(app, ["infer", "--model", str(lora_run), "--image", str(images[0]), "--max-new-tokens", "12"])
    assert infer.exit_code == 0, infer.output
    text = ours["tokenizer"].decode(theirs["results"][0]["new_ids"], skip_special_tokens=True).strip()
    assert text and infer.stdout.strip().endswith(text)


@pytest.mark.parametrize("encoder, llm, feature, strategy, extra_tokens, stop", [
    ("siglip", "tiny-llama", "patch", "full", 0, "<|eot_id|>"),  # SigLIP: every token is a patch
    ("clip", "tiny-phi3", "cls_patch", "full", 1, "<|end|>"),  # CLIP with its CLS token kept
])
def test_hf_llava_has_the_layout_transformers_saves(tmp_path, synth_data, encoder, llm, feature, strategy,
                                                    extra_tokens, stop):
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    from medmvl_cli.interop.export_hf import export_hf_llava

    text = SIGLIP_LLAMA.replace("siglip", encoder).replace("tiny-llama", llm).replace("select_feature: patch",
                                                                                       f"select_feature: {feature}")
    source = model_folder(tmp_path, text)
    out = export_hf_llava(source, tmp_path / "llava")
    config = json.loads((out / "config.json").read_text())
    ours, our_processor = load(source, merge_lora=False, device=None)
    assert config["vision_feature_select_strategy"] == strategy
    assert config["vision_feature_layer"] == -2
    assert config["image_token_index"] == ours.config.image_token_id
    assert config["image_seq_length"] == ours.num_tokens("image") == 16 + extra_tokens
    # What transformers itself writes for this config, key for key and shape for shape.
    reference = tmp_path / "reference"
    LlavaForConditionalGeneration(LlavaConfig.from_pretrained(out)).save_pretrained(reference)
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(reference / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.get_slice(k).get_shape() == b.get_slice(k).get_shape() for k in a.keys())
        assert "language_model.lm_head.weight" in a.keys()  # neither LLM ties its head
    llava, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    processor = AutoProcessor.from_pretrained(out)
    assert (processor.patch_size, processor.num_additional_image_tokens) == (8, extra_tokens)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == ours.config.image_token_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert processor.tokenizer.convert_tokens_to_ids(stop) in generation["eos_token_id"]
    # Same logits as the medmvl model, through LLaVA's own processor (llama3: bos from the template).
    from PIL import Image

    image = sample_images(synth_data)[0]
    text = processor.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.open(image).convert("RGB"), text=text, add_special_tokens=False, return_tensors="pt")
    assert (inputs["input_ids"][0, 0].item() == processor.tokenizer.bos_token_id) == (llm == "tiny-llama")
    assert (inputs["input_ids"] == ours.config.image_token_id).sum() == ours.num_tokens("image")
    with torch.no_grad():
        theirs = llava.eval()(**inputs).logits[0]
    assert torch.allclose(theirs, logits_of(ours, our_processor, image), atol=1e-4)


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-qwen2"])
def test_hf_llava_processor_takes_the_documented_typed_message_shape(tmp_path, synth_data, llm):
    """transformers' LLaVA docs call `processor.apply_chat_template` on messages whose content is
    a list of typed parts; the export gives the prompt ids and pixels medmvl infer gives."""
    from transformers import AutoProcessor

    from medmvl_cli.interop.export_hf import export_hf_llava

    source = model_folder(tmp_path, SIGLIP_LLAMA.replace("tiny-llama", llm))
    out = export_hf_llava(source, tmp_path / "llava")
    image = sample_images(synth_data)[0]
    question = PROMPT.removeprefix("<image>\n")
    messages = [  # the shape of the transformers LLaVA documentation, with a local file as the url
        {"role": "user", "content": [{"type": "image", "url": str(image)}, {"type": "text", "text": question}]},
    ]
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    predictor = Predictor(source)
    assert inputs["input_ids"][0].tolist() == predictor.prompt_ids([{"role": "user", "content": PROMPT}])
    torch.testing.assert_close(inputs["pixel_values"], predictor.processor.images([image]))
    # The tokenizer alone renders the same text for the string and the typed form.
    as_text = processor.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == as_text


# What transformers 4.52-4.57's LlavaForConditionalGeneration._checkpoint_conversion_mapping does to
# on-disk keys (before 4.52 the on-disk names were the module names themselves).
TRANSFORMERS4_MAPPING = {
    r"^language_model.model": "model.language_model",
    r"^vision_tower": "model.vision_tower",
    r"^multi_modal_projector": "model.multi_modal_projector",
    r"^language_model.lm_head": "lm_head",
}


def test_transformers4_variant_matches_what_transformers4_loads(tmp_path, synth_data):
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    source = model_folder(tmp_path, SIGLIP_LLAMA)
    result = runner.invoke(app, ["export", "--model", str(source), "--out", str(tmp_path / "llava4"),
                                 "--format", "hf-llava", "--transformers4"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "llava4"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "processor_config.json", "preprocessor_config.json", "chat_template.json", "medmvl-export.json"])
    # Weights: 4.x's vision tower is a SiglipVisionModel, whose keys start with vision_model.
    state = load_file(str(out / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    vision = [k for k in state if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    config = json.loads((out / "config.json").read_text())
    llava = LlavaForConditionalGeneration(LlavaConfig(**{k: v for k, v in config.items() if k != "torch_dtype"}))
    expected = {k.replace("model.vision_tower.", "model.vision_tower.vision_model.") for k in llava.state_dict()}
    renamed = {}
    for key, value in state.items():
        for pattern, target in TRANSFORMERS4_MAPPING.items():
            key = re.sub(pattern, target, key)
        renamed[key] = value
    assert set(renamed) == expected
    # Those weights, put into a model, give the medmvl model's logits.
    llava.load_state_dict({k.replace("model.vision_tower.vision_model.", "model.vision_tower."): v
                           for k, v in renamed.items()})
    # Config: 4.x names for RoPE and dtype; the same architecture.
    text = config["text_config"]
    assert text["rope_theta"] == 10000.0 and "rope_parameters" not in text
    assert config["torch_dtype"] == "float32" and config["image_token_index"] == llava.config.image_token_id
    # Tokenizer: a class 4.x knows, special tokens as 4.x lists them, the chat template inline.
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not isinstance(tokenizer_config.get("extra_special_tokens"), list)
    assert "{{- bos_token }}" in tokenizer_config["chat_template"]
    assert json.loads((out / "chat_template.json").read_text())["chat_template"] == tokenizer_config["chat_template"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    ours, our_processor = load(source, merge_lora=False, device=None)
    our_tokenizer = our_processor.tokenizer
    assert tokenizer("a <image> b")["input_ids"] == our_tokenizer("a <image> b")["input_ids"]
    # Processor: image processor flat in preprocessor_config.json, processor settings flat.
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert "image_processor" not in processor_config
    assert processor_config["patch_size"] == 8 and processor_config["vision_feature_select_strategy"] == "full"
    image_processor = AutoImageProcessor.from_pretrained(out)
    from PIL import Image

    image = sample_images(synth_data)[0]
    pixels = image_processor(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    text = text.replace("<image>", "<image>" * ours.num_tokens("image"))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = llava.eval()(input_ids=ids, pixel_values=pixels).logits[0]
    assert torch.allclose(theirs, logits_of(ours, our_processor, image), atol=1e-4)


def test_transformers4_text_config_keeps_rope_settings():
    from medmvl_cli.interop.llava_transformers4 import text_config_for_transformers4

    plain = text_config_for_transformers4({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "dtype": "bfloat16"})
    assert plain == {"rope_theta": 1e6, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    phi = text_config_for_transformers4({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.4, "rope_type": "default"}})
    assert phi == {"rope_theta": 1e4, "partial_rotary_factor": 0.4}
    llama3 = text_config_for_transformers4(
        {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}})
    assert llama3["rope_theta"] == 5e5
    assert llama3["rope_scaling"] == {"rope_type": "llama3", "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}


@pytest.mark.parametrize("text, reasons", [
    (RECIPE_3D, ["3D branch", "no 2D branch"]),
    (SIGLIP_LLAMA.replace("depth: 2", "depth: 3"), ["depth 3"]),
    (SIGLIP_LLAMA.replace("gelu", "relu"), ["relu"]),
    (SIGLIP_LLAMA.replace("tiny-llama", "tiny-phi"), ["output head has a bias"]),
    (SIGLIP_LLAMA.replace("{type: mlp, depth: 2, activation: gelu}", "{type: spatial_pooling, pool: 2}"),
     ["'spatial_pooling'"]),
    (SIGLIP_LLAMA.replace("{type: mlp, depth: 2, activation: gelu}", "{type: attention_pooling, heads: 4}")
     + """  image3d:
    encoder: {type: slices, base: siglip, preset: tiny, num_slices: 2}
    connector: {type: attention_pooling, heads: 4, slice_mean: true}
    volume: {size: [2, 32, 32]}
""", ["'attention_pooling'", "3D branch (model.image3d, a slices encoder)"]),
])
def test_hf_llava_refuses_stacks_that_are_not_llava(tmp_path, synth_data, text, reasons):
    source = model_folder(tmp_path, text.replace("{data}", str(synth_data)).replace("{{", "{").replace("}}", "}"))
    result = runner.invoke(app, ["export", "--model", str(source), "--out", str(tmp_path / "out"), "--format", "hf-llava"])
    assert result.exit_code == 1
    message = flat(result.output)
    assert "cannot be exported as transformers' LLaVA" in message
    for reason in reasons:
        assert reason in message, (reason, message)
    assert not (tmp_path / "out").exists()


def test_export_options_are_checked(tmp_path, monkeypatch):
    bad = runner.invoke(app, ["export", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--format", "onnx"])
    assert bad.exit_code == 2
    t4 = runner.invoke(app, ["export", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--transformers4"])
    assert t4.exit_code == 2 and "hf-llava" in flat(t4.output)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDMVL_MODEL", raising=False)
    none = runner.invoke(app, ["export", "--out", str(tmp_path / "o")])
    assert none.exit_code == 1 and "medmvl import medm-vl" in flat(none.output)
