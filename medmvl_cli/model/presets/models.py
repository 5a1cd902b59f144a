"""Built-in tiny random-init models (tests, quickstart), materialised as real HF folders.

Presets travel the same road as real models: each is written once into a cache folder with
`save_pretrained` and loaded from there with `from_pretrained`, so the loading code under test is
the code that loads Qwen2.5-3B. Weights are deterministic (fixed seed), so two machines build the
same preset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from medmvl_cli.errors import ModelError

logger = logging.getLogger(__name__)

# Bump when a preset's definition changes, so stale cache folders are not reused.
PRESET_VERSION = 1

LLM_PRESETS: dict[str, dict] = {
    "tiny-qwen2": {
        "family": "qwen2", "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "tie_word_embeddings": True,
    },
    "tiny-llama": {
        "family": "llama3", "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    "tiny-phi": {
        "family": "phi", "model_type": "phi", "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "partial_rotary_factor": 0.5,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    "tiny-phi3": {
        "family": "phi3", "model_type": "phi3", "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
}

# 32 px images in 8 px patches: 16 patch tokens (+ CLS for CLIP).
ENCODER_PRESETS: dict[str, dict] = {
    "clip": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "siglip": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
}

# The random-init 3D ViT; its input size comes from `volume.size`.
VIT3D_PRESETS: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 128, "patch_size": (4, 8, 8)},
}


def cache_root() -> Path:
    """Where presets are materialised: $MEDMVL_CACHE, else ~/.cache/medmvl."""
    return Path(os.environ.get("MEDMVL_CACHE") or Path.home() / ".cache" / "medmvl")


def _folder(kind: str, name: str, definition: dict) -> Path:
    digest = hashlib.sha256(json.dumps([PRESET_VERSION, definition], sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / "presets" / f"{kind}-{name}-{digest}"


def _materialise(target: Path, write, required: tuple[str, ...] = ("config.json", "model.safetensors")) -> Path:
    """Write a folder once, atomically: build beside the target, then rename into place.

    `required` files must exist after `write`, or nothing is kept (a folder marked DONE is trusted)."""
    if (target / "DONE").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        missing = [name for name in required if not (staging / name).is_file()]
        if missing:
            raise ModelError(f"writing the preset {target.name} left out {', '.join(missing)}",
                             hint="run `medmvl env` to check the installation, then retry")
        (staging / "DONE").write_text("ok\n")
        try:
            os.replace(staging, target)
        except OSError:
            # Another process won the race, or a partial folder is in the way.
            if not (target / "DONE").is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.debug("materialised preset %s", target)
    return target


def llm_preset_dir(name: str) -> Path:
    """The HF folder (config, safetensors, tokenizer, chat template) of a tiny LLM preset."""
    if name not in LLM_PRESETS:
        raise ModelError(f"unknown LLM preset {name!r}", hint=f"use one of {', '.join(LLM_PRESETS)}")
    definition = dict(LLM_PRESETS[name])
    family = definition.pop("family")

    def write(folder: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from medmvl_cli.model.presets.tokenizer_files import preset_tokenizer_dir

        tokenizer = AutoTokenizer.from_pretrained(preset_tokenizer_dir(family))
        fields = dict(definition)
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(
            model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **fields,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    from medmvl_cli.model.presets.tokenizer_files import preset_tokenizer_dir

    tokenizer_digest = hashlib.sha256((preset_tokenizer_dir(family) / "tokenizer.json").read_bytes()).hexdigest()
    return _materialise(_folder("llm", name, {**LLM_PRESETS[name], "tokenizer": tokenizer_digest}), write)


def encoder_preset_dir(kind: str) -> Path:
    """The HF folder (vision config, safetensors, image processor) of a tiny CLIP or SigLIP tower."""
    if kind not in ENCODER_PRESETS:
        raise ModelError(f"no tiny preset for encoder type {kind!r}", hint=f"presets exist for {', '.join(ENCODER_PRESETS)} and vit3d")
    fields = ENCODER_PRESETS[kind]

    def write(folder: Path) -> None:
        import torch
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            CLIPVisionModel,
            SiglipImageProcessor,
            SiglipVisionConfig,
            SiglipVisionModel,
        )

        size = fields["image_size"]
        if kind == "clip":
            config, model_cls = CLIPVisionConfig(**fields), CLIPVisionModel
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        else:
            config, model_cls = SiglipVisionConfig(**fields), SiglipVisionModel
            processor = SiglipImageProcessor(size={"height": size, "width": size})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = model_cls(config)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return _materialise(_folder("encoder", kind, fields), write)
