"""Prefix reuse: the prompt tokens that several questions of a batch share are prefilled once.

CT-RATE-style files ask 3-5 questions about each volume; their prompts agree up to where the
questions differ (system prompt, template head, the volume's hundreds of placeholder tokens). Rows
are grouped by their media (the same volumes and images, hence the same features), and a group's
prefix is the longest run of ids its prompts share from the start, less at least one token so
every row has a suffix to generate from. The prefixes are prefilled once per group into a
`DynamicCache`, whose rows are then repeated for the group's questions, as vLLM's automatic prefix
caching does.

Layout: prefixes are left-padded to the longest prefix, suffixes left-padded after it, so a row
reads `[pads, prefix][pads, suffix]`; the attention mask hides both runs of pads and positions are
counted over unmasked tokens (as `generate` counts them), so every real token has the position,
the keys it attends to and hence the answer it has in the plain left-padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Sequence


@dataclass
class PrefixPlan:
    """Which rows share a prefix: `group_of_row[r]` indexes `prefix_lengths` and `first_row`
    (the row whose embeddings stand for its group's prefix)."""

    group_of_row: list[int]
    prefix_lengths: list[int]
    first_row: list[int]

    def tokens_saved(self) -> int:
        """Prefix tokens not computed again: each group's prefix, once per row beyond the first."""
        return sum(self.prefix_lengths[g] for g in self.group_of_row) - sum(self.prefix_lengths)


def plan_shared_prefixes(prompts: Sequence[Sequence[int]], media: Sequence[Hashable]) -> Optional[PrefixPlan]:
    """A plan when some rows share their media (a non-empty key) and a prefix; None otherwise
    (nothing to reuse: the plain batch is as fast)."""
    groups: dict[Hashable, list[int]] = {}
    for row, key in enumerate(media):
        groups.setdefault(key if key else ("row", row), []).append(row)
    if all(len(rows) == 1 for rows in groups.values()):
        return None
    group_of_row, prefix_lengths, first_row = [0] * len(prompts), [], []
    for g, rows in enumerate(groups.values()):
        shortest = min(len(prompts[r]) for r in rows)
        shared = _common_prefix_length([prompts[r] for r in rows])
        prefix_lengths.append(min(shared, shortest - 1))
        first_row.append(rows[0])
        for r in rows:
            group_of_row[r] = g
    plan = PrefixPlan(group_of_row, prefix_lengths, first_row)
    return plan if plan.tokens_saved() > 0 else None


def _common_prefix_length(prompts: list[Sequence[int]]) -> int:
    first = prompts[0]
    length = min(len(p) for p in prompts)
    for other in prompts[1:]:
        n = 0
        while n < length and other[n] == first[n]:
            n += 1
        length = n
    return length


def generate_with_plan(model, plan: PrefixPlan, inputs_embeds, attention_mask, **generation_kwargs):
    """(B, new) generated ids for the left-padded batch `inputs_embeds` (B, L, width) /
    `attention_mask` (B, L), each group's prefix prefilled once (see the module doc)."""
    import torch

    lengths = attention_mask.sum(-1).tolist()  # rows are left-padded: row r's tokens are its last lengths[r]
    width, total = inputs_embeds.shape[-1], inputs_embeds.shape[1]
    longest_prefix = max(plan.prefix_lengths)
    longest_suffix = max(n - plan.prefix_lengths[g] for n, g in zip(lengths, plan.group_of_row))
    prefix_embeds = inputs_embeds.new_zeros((len(plan.first_row), longest_prefix, width))
    prefix_mask = attention_mask.new_zeros((len(plan.first_row), longest_prefix))
    for g, (row, p) in enumerate(zip(plan.first_row, plan.prefix_lengths)):
        start = total - lengths[row]
        prefix_embeds[g, longest_prefix - p:] = inputs_embeds[row, start:start + p]
        prefix_mask[g, longest_prefix - p:] = 1
    cache = model.prefill(prefix_embeds, prefix_mask)
    rows = torch.tensor(plan.group_of_row, device=inputs_embeds.device)
    cache.batch_select_indices(rows)  # each group's keys and values, once per question of the group

    # The prefix part of these embeddings is never read: `generate` starts after the cache.
    embeds = inputs_embeds.new_zeros((len(lengths), longest_prefix + longest_suffix, width))
    mask = torch.cat([prefix_mask[rows], attention_mask.new_zeros((len(lengths), longest_suffix))], dim=1)
    for r, (n, g) in enumerate(zip(lengths, plan.group_of_row)):
        suffix = n - plan.prefix_lengths[g]
        embeds[r, embeds.shape[1] - suffix:] = inputs_embeds[r, total - suffix:]
        mask[r, mask.shape[1] - suffix:] = 1
    return model.generate(inputs_embeds=embeds, attention_mask=mask, cache=cache, **generation_kwargs)
