"""`medmvl export --format medmvl`: a self-contained model folder that `medmvl infer` / `demo` load.

The run's `model/` is loaded and saved again (config, safetensors, tokenizer, image processor,
volume preprocessing in config.json), so the export is checked to load and needs nothing outside
itself. Its `chat_template.jinja` is the Jinja twin of the template the model answers with (the
template registry's `jinja`), so `apply_chat_template` gives the prompts `medmvl infer` builds.
A LoRA adapter stays a PEFT adapter in `llm_adapter/` unless `merge_lora`, which folds it into the
LLM's weights (the same answers, and a folder any tool that does not know PEFT can read).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def saved_dtype(model_dir: Path) -> str:
    """The dtype the folder's weights were saved in (float32 when config.json does not say)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return name if name in DTYPE_NAMES else "float32"


def has_adapter(model_dir: Path) -> bool:
    try:
        return bool(json.loads((Path(model_dir) / "config.json").read_text()).get("llm_adapter"))
    except (OSError, ValueError):
        return False


def export_medmvl(model_dir: Path, out: Path, *, merge_lora: bool = False, overwrite: bool = False,
                  dtype: str | None = None) -> Path:
    """Write the model of `model_dir` to `out` (atomically); returns `out`."""
    from medmvl_cli.inference.load import load
    from medmvl_cli.interop.staging import EXPORT, check_output, staged_folder, write_export_manifest
    from medmvl_cli.model.builder import save_model

    check_output(Path(out), overwrite, EXPORT)  # before the slow load
    model, processor = load(model_dir, dtype=dtype or saved_dtype(model_dir), device=None, merge_lora=merge_lora)
    if merge_lora and not has_adapter(model_dir):
        logger.info("%s has no LoRA adapter: nothing to merge", model_dir)
    with staged_folder(out, overwrite, EXPORT) as staging:
        save_model(model, staging, processor)
        write_export_manifest(staging)
    logger.info("exported %s to %s%s", model_dir, out, " (LoRA merged)" if merge_lora else "")
    return out
