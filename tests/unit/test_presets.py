"""Built-in tiny presets travel the road real models do: HF folders loaded with from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, SiglipVisionModel

from medmvl_cli.errors import ModelError
from medmvl_cli.model.presets import models
from medmvl_cli.model.presets.models import LLM_PRESETS, encoder_preset_dir, llm_preset_dir

EXPECTED_CLASSES = {"tiny-qwen2": "Qwen2ForCausalLM", "tiny-llama": "LlamaForCausalLM",
                    "tiny-phi": "PhiForCausalLM", "tiny-phi3": "Phi3ForCausalLM"}


def test_presets_are_the_names_a_recipe_may_use():
    from medmvl_cli.config.names import PRESET_TEMPLATES

    assert {name: d["family"] for name, d in LLM_PRESETS.items()} == PRESET_TEMPLATES


@pytest.mark.parametrize("name", sorted(LLM_PRESETS))
def test_llm_preset_builds_saves_and_reloads_identically(name, tmp_path):
    folder = llm_preset_dir(name)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == EXPECTED_CLASSES[name]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer)
    for token in ("<image>", "<image3d>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    model.save_pretrained(tmp_path / "copy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), key
    # the chat template round-trips: rendered text tokenises to what apply_chat_template returns
    messages = [{"role": "user", "content": "Is there a nodule?"}, {"role": "assistant", "content": "No."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert "Is there a nodule?" in text and "No." in text
    assert tokenizer.decode(ids) == text


def test_presets_are_deterministic_across_caches(tmp_path, monkeypatch):
    first = AutoModelForCausalLM.from_pretrained(llm_preset_dir("tiny-llama")).state_dict()
    monkeypatch.setenv("MEDMVL_CACHE", str(tmp_path / "other-cache"))
    folder = llm_preset_dir("tiny-llama")
    assert str(folder).startswith(str(tmp_path))
    second = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_materialised_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMVL_CACHE", str(tmp_path))
    folder = llm_preset_dir("tiny-qwen2")
    assert (folder / "DONE").is_file()
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    assert llm_preset_dir("tiny-qwen2") == folder
    assert os.stat(folder / "model.safetensors").st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.parametrize("kind, cls, tokens", [("clip", CLIPVisionModel, 17), ("siglip", SiglipVisionModel, 16)])
def test_encoder_presets(kind, cls, tokens):
    folder = encoder_preset_dir(kind)
    tower = cls.from_pretrained(folder)
    size = models.ENCODER_PRESETS[kind]["image_size"]
    out = tower(pixel_values=torch.zeros(1, 3, size, size))
    assert out.last_hidden_state.shape == (1, tokens, models.ENCODER_PRESETS[kind]["hidden_size"])
    assert (folder / "preprocessor_config.json").is_file()


def test_unknown_presets_are_explained():
    with pytest.raises(ModelError, match="tiny-qwen2"):
        llm_preset_dir("tiny-gpt")
    with pytest.raises(ModelError, match="clip"):
        encoder_preset_dir("vit3d")


def test_a_writer_that_leaves_out_weights_marks_nothing_done(tmp_path):
    # (What happened when a ZeRO-3 run built a preset: the partitioned model saved no weights.)
    target = tmp_path / "presets" / "llm-broken"

    def write_tokenizer_only(folder):
        (folder / "tokenizer.json").write_text("{}")

    with pytest.raises(ModelError, match="model.safetensors"):
        models._materialise(target, write_tokenizer_only)
    assert not target.exists() and not list(target.parent.iterdir())


def test_a_recipe_s_presets_are_written_before_training_starts(tmp_path, monkeypatch):
    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.model.builder import materialise_presets

    monkeypatch.setenv("MEDMVL_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "tiny-2d.yaml",
                         stage="finetune")
    materialise_presets(recipe)
    written = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache" / "presets").iterdir())
    assert written == ["encoder-clip", "llm-tiny-qwen2"]
    assert all((p / "DONE").is_file() for p in (tmp_path / "cache" / "presets").iterdir())
