"""Rewrite a LLaVA folder written by transformers 5.x into the form transformers 4.x loads.

What 4.x's loading code expects (modeling_llava.py `_checkpoint_conversion_mapping`, 4.52-4.57:
`^language_model.model -> model.language_model`, `^vision_tower -> model.vision_tower`,
`^multi_modal_projector -> model.multi_modal_projector`, `^language_model.lm_head -> lm_head`;
before 4.52 those on-disk names were the module names themselves):

- weights: the vision tower is a `CLIPVisionModel` / `SiglipVisionModel` whose keys start with
  `vision_model.` in 4.x, so `vision_tower.*` becomes `vision_tower.vision_model.*`; the LLM stays
  under `language_model.model.*` / `language_model.lm_head.*`; metadata `{"format": "pt"}`;
- `config.json`: 5.x's `rope_parameters` become 4.x's `rope_theta` (+ `partial_rotary_factor`,
  + `rope_scaling` for non-default RoPE) in the text config, and `dtype` is also written as
  `torch_dtype` (4.x < 4.56 reads only that);
- `tokenizer_config.json`: a tokenizer class 4.x knows (`PreTrainedTokenizerFast`, which reads
  `tokenizer.json` as it is), `extra_special_tokens` (a list in 5.x, a dict of named tokens in 4.x,
  where a list fails with "'list' object has no attribute 'keys'") as `additional_special_tokens`,
  and the chat template inline (4.x before 4.50 reads it only there);
- processor: 5.x nests the image processor in `processor_config.json`; 4.x reads it from
  `preprocessor_config.json` and the processor's own settings flat from `processor_config.json`;
  the chat template goes to `chat_template.json` (read by every 4.x since 4.43) instead of
  `chat_template.jinja` (read only from 4.50, and second to the .json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# 5.x bookkeeping in tokenizer_config.json that 4.x would pass to the tokenizer as unknown kwargs.
_TOKENIZER_5X_KEYS = ("backend", "is_local", "local_files_only")


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def text_config_for_transformers4(text: dict[str, Any]) -> dict[str, Any]:
    """A 5.x text config with RoPE settings and dtype in 4.x's fields."""
    text = dict(text)
    rope = text.pop("rope_parameters", None)
    if isinstance(rope, dict):
        rope = dict(rope)
        if "rope_theta" in rope:
            text["rope_theta"] = rope.pop("rope_theta")
        if "partial_rotary_factor" in rope:
            text["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        kind = rope.get("rope_type", "default")
        if kind != "default":
            text["rope_scaling"] = {**rope, "type": kind}  # 4.x reads rope_type, older 4.x type
    if "dtype" in text:
        text["torch_dtype"] = text["dtype"]
    return text


def config_for_transformers4(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    config["text_config"] = text_config_for_transformers4(config["text_config"])
    vision = dict(config["vision_config"])
    if "dtype" in vision:
        vision["torch_dtype"] = vision["dtype"]
    config["vision_config"] = vision
    if "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    return config


def tokenizer_config_for_transformers4(config: dict[str, Any], chat_template: str | None) -> dict[str, Any]:
    config = {k: v for k, v in config.items() if k not in _TOKENIZER_5X_KEYS}
    config["tokenizer_class"] = TOKENIZER_CLASS
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, dict):
        config["extra_special_tokens"] = extra  # already 4.x's named form
    elif extra:
        config["additional_special_tokens"] = list(extra)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def _rename_vision_keys(folder: Path) -> None:
    """vision_tower.X -> vision_tower.vision_model.X in every shard (and the index)."""
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    shards = sorted(set(_read(index_path)["weight_map"].values())) if index_path.is_file() else ["model.safetensors"]

    def rename(key: str) -> str:
        return "vision_tower.vision_model." + key[len("vision_tower."):] if key.startswith("vision_tower.") else key

    for shard in shards:
        state = load_file(str(folder / shard))
        save_file({rename(k): v for k, v in state.items()}, str(folder / shard), metadata={"format": "pt"})
    if index_path.is_file():
        index = _read(index_path)
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        _write(index_path, index)


def convert_folder_for_transformers4(folder: Path) -> None:
    """Rewrite, in place, a LLaVA folder written by `export_hf_llava` for transformers 4.x."""
    folder = Path(folder)
    _rename_vision_keys(folder)
    _write(folder / "config.json", config_for_transformers4(_read(folder / "config.json")))

    jinja = folder / "chat_template.jinja"
    chat_template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    tokenizer_config = folder / "tokenizer_config.json"
    _write(tokenizer_config, tokenizer_config_for_transformers4(_read(tokenizer_config), chat_template))

    processor_config = folder / "processor_config.json"
    processor = _read(processor_config)
    image_processor = processor.pop("image_processor", None)
    if image_processor is not None:
        _write(folder / "preprocessor_config.json", {**image_processor, "processor_class": processor.get("processor_class", "LlavaProcessor")})
    processor.pop("chat_template", None)
    _write(processor_config, processor)
    if chat_template is not None:
        _write(folder / "chat_template.json", {"chat_template": chat_template})
        jinja.unlink()
