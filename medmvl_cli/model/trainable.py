"""Which parts train: one setting per component (frozen | full, and lora for the LLM).

Components (`model.components()`): llm, image_encoder, image_connector, image3d_encoder,
image3d_connector. `apply_lora` wraps the LLM with a PEFT LoRA adapter (whose weights train, the
LLM's own freeze); `apply_trainable` freezes / unfreezes each component as the recipe's
`trainable` says (for `llm: lora`, only the adapter's weights train). They may be called in
either order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from medmvl_cli.errors import ModelError
from medmvl_cli.model.llm import is_peft_model

logger = logging.getLogger(__name__)


def _setting(cfg: Any, name: str):
    return cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)


def apply_trainable(model: nn.Module, trainable_cfg: Any) -> None:
    """Set `requires_grad` per component from `trainable_cfg` (the recipe's `trainable` section
    or a dict); components whose setting is None are left as they are."""
    parts = model.components()
    for name in ("llm", "image_encoder", "image_connector", "image3d_encoder", "image3d_connector"):
        mode = _setting(trainable_cfg, name)
        if mode is None:
            continue
        if name not in parts:
            raise ModelError(
                f"trainable.{name} is {mode!r} but the model has no {name.split('_')[0]} branch",
                hint=f"remove trainable.{name} or add the branch to the model",
            )
        module = parts[name]
        if mode == "full":
            if name == "llm" and is_peft_model(module):
                raise ModelError(
                    "trainable.llm is full but the LLM carries a LoRA adapter",
                    hint="use llm: lora, or do not call apply_lora",
                )
            module.requires_grad_(True)
        elif mode == "frozen":
            module.requires_grad_(False)
        elif mode == "lora" and name == "llm":
            # Before apply_lora: the base LLM freezes and the adapter apply_lora adds trains;
            # after it: only the adapter's tensors train. Either order ends the same.
            for param_name, param in module.named_parameters():
                param.requires_grad_(is_peft_model(module) and "lora_" in param_name)
        else:
            raise ModelError(f"trainable.{name}: unknown setting {mode!r}", hint="use frozen or full (or lora for llm)")
    for name, (total, trainable) in parameter_counts(model).items():
        logger.debug("%s: %d of %d parameters train", name, trainable, total)


def apply_lora(model: nn.Module, lora_cfg: Any) -> nn.Module:
    """Wrap `model.llm` with a PEFT LoRA adapter (r, alpha, dropout, target_modules from the
    recipe's `lora` section or a dict); `all-linear` = every linear layer of the LLM but the output
    head. Returns the model."""
    from peft import LoraConfig, get_peft_model

    if is_peft_model(model.llm):
        raise ModelError("the LLM already carries a LoRA adapter", hint="apply_lora once per model")
    targets = _setting(lora_cfg, "target_modules") or "all-linear"
    config = LoraConfig(
        r=int(_setting(lora_cfg, "r")),
        lora_alpha=float(_setting(lora_cfg, "alpha")),
        lora_dropout=float(_setting(lora_cfg, "dropout") or 0.0),
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )
    try:
        model.llm = get_peft_model(model.llm, config)
    except ValueError as err:
        raise ModelError(
            f"lora.target_modules {targets!r}: {err}", hint="use all-linear or names of the LLM's linear layers"
        ) from None
    return model


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{component: (total, trainable)} over `model.components()`; shared (tied) tensors count once."""
    counts: dict[str, tuple[int, int]] = {}
    for name, module in model.components().items():
        seen: set[int] = set()
        total = trainable = 0
        for param in module.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        counts[name] = (total, trainable)
    return counts
