"""Attention for packed rows (several samples in one row, positions restarting at 0) that stays
inside each sample without a dense (L x L) mask.

Paths, chosen by `use_packed_attention` from what the machine offers:
- `flash_attention_2` (CUDA, flash-attn installed, half precision): transformers itself runs the
  varlen kernel from the collator's `cu_seq_lens_q` / `max_length_q` (or the restarting
  `position_ids`), so a row pays only for its samples.
- `packed_sdpa` (anywhere else, the CPU path): each sample's slice of the row goes through SDPA
  with `is_causal=True` (PyTorch's fused CPU / GPU kernels), no mask built at all. Measured here
  against the alternatives: `flex_attention` has no backward on CPU (torch 2.13) and nested-jagged
  SDPA refuses `is_causal=True`, so neither can train on CPU.
- `dense` (the LLM runs `eager`, or uses sliding-window layers): transformers' block-diagonal
  mask over the whole row, as before; logged once.

Batches that are not packed (an attention mask is given, or positions do not restart) go through
plain SDPA unchanged, so one model serves packed training and padded evaluation or generation.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

PACKED_SDPA = "medmvl_packed_sdpa"  # the name registered with transformers' attention interfaces
_dense_logged = False


_last_bounds: tuple[torch.Tensor | None, list[int]] = (None, [])


def _host_bounds(cu_seq_lens: torch.Tensor) -> list[int]:
    """The collator's cumulative lengths as Python ints, read from the device once per forward:
    every layer gets the same tensor (on a GPU each read would be a host sync)."""
    global _last_bounds
    if _last_bounds[0] is not cu_seq_lens:
        _last_bounds = (cu_seq_lens, [int(x) for x in cu_seq_lens.reshape(-1).tolist()])
    return list(_last_bounds[1])


def segment_bounds(cu_seq_lens: torch.Tensor | None, position_ids: torch.Tensor | None,
                   length: int) -> list[int] | None:
    """Start offsets of the samples in a packed row plus its end ([0, a, b, ..., length]), from the
    collator's cumulative lengths or else from `position_ids` (1, length) restarting at 0; None
    when the row holds one sample."""
    if cu_seq_lens is not None:
        bounds = _host_bounds(cu_seq_lens)
    elif position_ids is not None and position_ids.shape[0] == 1 and position_ids.shape[-1] == length:
        starts = (position_ids[0] == 0).nonzero().view(-1).tolist()
        if not starts or starts[0] != 0:
            return None
        bounds = starts + [length]
    else:
        return None
    if bounds[-1] != length or len(bounds) <= 2:
        return None
    return bounds


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, *args, **kwargs):
    """query (1, heads, L, head_dim), key / value (1, kv_heads, L, head_dim) -> ((1, L, heads,
    head_dim), None): causal attention within each packed sample. Anything else (a mask, a
    cache's longer keys, batch > 1) goes to transformers' SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    bounds = None
    if attention_mask is None and query.shape[0] == 1 and key.shape[2] == length:
        bounds = segment_bounds(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"), length)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    kwargs["is_causal"] = True
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, *args, **kwargs)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=1), None


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for unpadded rows (the attention above splits packed ones, SDPA's `is_causal`
    covers a single sample); transformers' SDPA mask where padding is given."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs.get("q_length") == kwargs.get("kv_length"):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register `PACKED_SDPA` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
    return PACKED_SDPA


def _has_sliding_layers(config) -> bool:
    layer_types = getattr(config, "layer_types", None) or []
    return any(t != "full_attention" for t in layer_types) or (
        bool(getattr(config, "use_sliding_window", False)) and getattr(config, "sliding_window", None) is not None)


def choose_packed_attention(text_config, device: torch.device, dtype: torch.dtype) -> str:
    """`flash_attention_2`, `packed_sdpa` or `dense` for an LLM with `text_config` on `device`."""
    current = getattr(text_config, "_attn_implementation", None) or "sdpa"
    if current == "flash_attention_2":
        return "flash_attention_2"  # already the varlen path
    if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("flash_attn") is not None and current in ("sdpa", PACKED_SDPA)):
        return "flash_attention_2"
    if current in ("sdpa", PACKED_SDPA) and not _has_sliding_layers(text_config):
        return "packed_sdpa"
    return "dense"


def use_packed_attention(model) -> str:
    """Switch `model`'s LLM (a MedmvlForConditionalGeneration) to the packed path the machine
    offers; returns the path's name. The choice is runtime only: `_attn_implementation` is not
    saved with the config, so checkpoints load as before."""
    global _dense_logged
    llm = model.llm
    text_config = model.config.text_config
    # The trainer moves the model to the GPU later: decide by what the machine has.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = choose_packed_attention(text_config, device, next(llm.parameters()).dtype)
    if path == "flash_attention_2":
        if text_config._attn_implementation != "flash_attention_2":
            base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # under a LoRA wrapper
            base.set_attn_implementation("flash_attention_2")
    elif path == "packed_sdpa":
        text_config._attn_implementation = register()
    elif not _dense_logged:
        _dense_logged = True
        logger.warning("packed batches use a dense block-diagonal mask (attn_implementation %s%s): each packed row "
                       "pays attention over its whole length", text_config._attn_implementation,
                       ", sliding-window layers" if _has_sliding_layers(text_config) else "")
    logger.info("packed attention path: %s", path)
    return path
