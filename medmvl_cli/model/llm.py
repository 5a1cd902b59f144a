"""The language model side: dtype and attention choice, loading any HF causal LM with its
tokenizer, and the `<image>` / `<image3d>` placeholder tokens."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from medmvl_cli.constants import PLACEHOLDERS
from medmvl_cli.errors import ModelError
from medmvl_cli.model.weight_files import check_safetensors

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """`auto` -> bfloat16 on CUDA GPUs that support it, else float32; names -> torch dtypes."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}", hint=f"use auto or one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype != torch.float32 and not torch.cuda.is_available():
        logger.warning("dtype %s on CPU is much slower than float32; use dtype: auto or float32 there", name)
    return dtype


def check_attn_implementation(name: str) -> str:
    """The attention kernel to use; flash_attention_2 only where the flash-attn package is installed."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError(
            "attn_implementation flash_attention_2 needs the flash-attn package, which is not installed",
            hint="install the GPU extra (pip install 'medmvl[gpu]') on a CUDA machine, or use attn_implementation: sdpa",
        )
    if name not in ("sdpa", "eager", "flash_attention_2"):
        raise ModelError(f"unknown attn_implementation {name!r}", hint="use sdpa, eager or flash_attention_2")
    return name


def encoder_attn_implementation(llm_attn: str) -> str:
    """The vision towers use SDPA unless the LLM runs eager (then they do too, e.g. for debugging)."""
    return "eager" if llm_attn == "eager" else "sdpa"


def llm_folder(llm_cfg: Any) -> str:
    """The LLM's folder: its path, or the materialised preset."""
    if llm_cfg.preset is not None:
        from medmvl_cli.model.presets.models import llm_preset_dir

        return str(llm_preset_dir(llm_cfg.preset))
    return str(llm_cfg.path)


def load_llm(folder: str, dtype: torch.dtype, attn_implementation: str):
    """(causal LM, tokenizer) from an HF folder (or hub id where the hub is reachable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(folder).exists() and folder.startswith((".", "/", "~")):
        raise ModelError(f"LLM folder {folder} does not exist", hint="set model.llm.path to a local HF model folder")
    check_safetensors(folder, "model.llm.path", hint="restore the LLM folder (download or copy it again)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        llm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load a causal LM and its tokenizer from {folder} ({err})",
            hint="point model.llm.path at a local folder with config.json, weights and tokenizer files",
        ) from None
    return llm, tokenizer


def ensure_placeholder_tokens(tokenizer, llm) -> dict[str, int]:
    """Make `<image>` and `<image3d>` single special tokens of `tokenizer`, growing the LLM's
    embeddings when the new ids fall outside them. Returns {token: id}."""
    from tokenizers import AddedToken

    missing = [t for t in PLACEHOLDERS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        logger.info("added placeholder tokens %s to the tokenizer", ", ".join(missing))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in PLACEHOLDERS}
    for token, token_id in ids.items():
        if tokenizer(token, add_special_tokens=False)["input_ids"] != [token_id]:
            raise ModelError(
                f"the tokenizer splits {token} into several tokens",
                hint="the placeholder must be one special token; check the tokenizer's added tokens",
            )
    rows = llm.get_input_embeddings().weight.shape[0]
    if max(ids.values()) >= rows:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        logger.info("resized the LLM's embeddings from %d to %d rows for the placeholder tokens", rows, len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token: using eos (%s)", tokenizer.eos_token)
    return ids


def is_peft_model(module: torch.nn.Module | None) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, PeftModel)
