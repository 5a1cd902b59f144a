"""Batches for the model: padded (attention mask) or padding-free packed (position ids).

Sequences arrive at their final length, so the collator only pads or concatenates. Images and
volumes of the whole batch are concatenated in the order their placeholders appear (row-major),
which is the order the model's masked scatter fills them in.
"""

from __future__ import annotations

import torch

from medmvl_cli.constants import IGNORE_INDEX
from medmvl_cli.data.dataset import SKIPPED


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    return torch.cat(present) if present else None


class LVLMCollator:
    """`packing=False`: right-padded (B, L) batch with attention mask. `packing=True`: one (1, sum L) row
    with position ids restarting at 0 per sample (needs `use_cache=False`, as in training) and the
    samples' boundaries as transformers' varlen kwargs: `cu_seq_lens_q` / `cu_seq_lens_k` (n + 1,)
    int32 cumulative lengths, `max_length_q` / `max_length_k` the longest sample (an int)."""

    def __init__(self, pad_token_id: int, packing: bool = False):
        self.pad_token_id = pad_token_id
        self.packing = packing

    def __call__(self, features: list[dict]) -> dict:
        skipped = [f[SKIPPED] for f in features if SKIPPED in f]
        features = [f for f in features if SKIPPED not in f]
        batch = self._pack(features) if self.packing else self._pad(features)
        batch["pixel_values"] = _cat([f.get("pixel_values") for f in features])
        batch["volumes"] = _cat([f.get("volumes") for f in features])
        batch = {k: v for k, v in batch.items() if v is not None}
        if skipped:
            batch[SKIPPED] = skipped
        return batch

    def _pad(self, features: list[dict]) -> dict:
        if not features:
            return {}
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = f["input_ids"]
            labels[row, :n] = f["labels"]
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def _pack(self, features: list[dict]) -> dict:
        if not features:
            return {}
        labels = []
        for f in features:
            sample = f["labels"].clone()
            sample[0] = IGNORE_INDEX  # never predict a sample's first token from the previous sample
            labels.append(sample)
        lengths = [len(f["input_ids"]) for f in features]
        cu_seq_lens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return {
            "input_ids": torch.cat([f["input_ids"] for f in features])[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            # What the packed attention paths split on (flash-attn varlen on GPU, per-sample SDPA on
            # CPU), given here so no layer has to find the boundaries in position_ids again.
            "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(lengths), "max_length_k": max(lengths),
        }
