"""The tokenizers shipped inside the package: load offline, round-trip, hold their specials."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from medmvl_cli.data.templates import get_template
from medmvl_cli.errors import ModelError
from medmvl_cli.model.presets.tokenizer_files import (
    FAMILIES,
    TOKENIZER_SPECS,
    load_preset_tokenizer,
    preset_tokenizer_dir,
)

MEDICAL_TEXT = [
    "Findings: A 6 mm solid nodule in the right upper lobe (series 3, image 42), unchanged since 2021-03-14.",
    "Impression: No acute cardiopulmonary process.\n\nRecommendation: follow-up CT in 12 months.",
    "Window [-1000, 1000] HU; spacing 1.5 x 0.75 x 0.75 mm; CTDIvol 8.4 mGy; 120 kV / 180 mAs.",
    "Ki-67 ≈ 15%, tumor size 1.8 cm, margin ≥ 4 mm, 0.25 µm/pixel, temperature 38.6 °C.",
    "(a) Clear lungs (b) Scattered small nodules (c) Hilar lymphadenopathy (d) Lobar consolidation",
    "Patient's   spacing\ttabs and  double  spaces  \n trailing ",
    "肺结节 6 mm — Röntgen-Thorax: kein Pneumothorax. Épanchement pleural: non.",
]

# The developer script that made the shipped folders lives outside the package (tools/).
_TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_tokenizers.py"
_spec = importlib.util.spec_from_file_location("make_tokenizers", _TOOL)
make_tokenizers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tokenizers)


@pytest.fixture(scope="module")
def tokenizers():
    return {f: load_preset_tokenizer(f) for f in FAMILIES}


def test_loads_offline_in_a_fresh_process(tmp_path):
    """AutoTokenizer loads every shipped folder with the hub switched off and an empty cache."""
    code = (
        "from transformers import AutoTokenizer\n"
        "from medmvl_cli.model.presets.tokenizer_files import FAMILIES, preset_tokenizer_dir\n"
        "for f in FAMILIES:\n"
        "    t = AutoTokenizer.from_pretrained(preset_tokenizer_dir(f))\n"
        "    print(f, len(t), t.convert_tokens_to_ids('<image>'))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == list(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_is_a_real_hf_tokenizer_folder(family):
    folder = preset_tokenizer_dir(family)
    assert {p.name for p in folder.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == get_template(family).jinja()
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["eos_token"] == TOKENIZER_SPECS[family].eos_token


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens(tokenizers, family):
    tok, spec = tokenizers[family], TOKENIZER_SPECS[family]
    assert 2000 <= len(tok) <= 4200
    assert tok.bos_token == spec.bos_token and tok.eos_token == spec.eos_token and tok.pad_token == spec.pad_token
    for token in spec.special_tokens:
        tid = tok.convert_tokens_to_ids(token)
        assert isinstance(tid, int) and tok.encode(token, add_special_tokens=False) == [tid]
        # Never split, wherever it sits in text.
        assert tok.encode(f"x{token}y", add_special_tokens=False).count(tid) == 1
    # Specials sit after the BPE vocabulary, in the listed order.
    ids = tok.convert_tokens_to_ids(list(spec.special_tokens))
    assert ids == list(range(ids[0], ids[0] + len(ids))) and ids[-1] == len(tok) - 1
    image, image3d = tok.convert_tokens_to_ids(["<image>", "<image3d>"])
    assert image != image3d
    assert tok.encode("<image>\n<image3d><image>", add_special_tokens=False).count(image) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_is_added_only_where_the_family_adds_it(tokenizers, family):
    tok = tokenizers[family]
    ids = tok("Normal chest.")["input_ids"]
    assert (ids[0] == tok.bos_token_id) == TOKENIZER_SPECS[family].add_bos
    assert tok.encode("Normal chest.", add_special_tokens=False) == (ids[1:] if TOKENIZER_SPECS[family].add_bos else ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("text", MEDICAL_TEXT)
def test_encode_decode_round_trip(tokenizers, family, text):
    tok = tokenizers[family]
    ids = tok.encode(text, add_special_tokens=False)
    # Qwen2 normalises to NFC first, as the real one does.
    assert tok.decode(ids) == (unicodedata.normalize("NFC", text) if family == "qwen2" else text)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_of_the_whole_corpus_and_medical_words_are_short(tokenizers, family):
    tok = tokenizers[family]
    lines = make_tokenizers.corpus_lines()
    text = "\n".join(lines)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # Trained on medical text: common terms are one or two tokens, not letters.
    for word in (" pneumothorax", " consolidation", " effusion", " nodule", " radiograph"):
        assert len(tok.encode(word, add_special_tokens=False)) <= 2, word


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(tokenizers, family, tmp_path):
    from transformers import AutoTokenizer

    tok = tokenizers[family]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tok)
    assert again.chat_template == tok.chat_template
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(again, attr) == getattr(tok, attr)
    for text in MEDICAL_TEXT + ["<image>\nIs there an effusion?<image3d>"]:
        assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_regenerating_gives_the_shipped_folders(tmp_path):
    """make_tokenizers is deterministic and the shipped folders are what it makes."""
    fresh = make_tokenizers.write_all(tmp_path)
    for family, folder in fresh.items():
        assert make_tokenizers.folder_fingerprint(folder) == make_tokenizers.folder_fingerprint(
            preset_tokenizer_dir(family)
        ), family


def test_corpus_is_small_medical_text():
    corpus = make_tokenizers.CORPUS
    assert corpus.stat().st_size < 200_000
    lines = make_tokenizers.corpus_lines()
    assert len(lines) >= 300
    text = " ".join(lines).lower()
    for term in ("chest x-ray", "ct", "pathology", "dermoscop", " hu", " mm"):
        assert term in text


def test_unknown_family():
    with pytest.raises(ModelError) as err:
        preset_tokenizer_dir("mistral")
    assert "mistral" in str(err.value) and "phi3" in str(err.value)
