"""Prefix reuse: the prompt tokens that several questions of a batch share are prefilled once.

CT-RATE-style files ask 3-5 questions about each volume; their prompts agree up to where the
questions differ (system prompt, template head, the volume's hundreds of placeholder tokens). Rows
are grouped by their media (the same volumes and images, hence the same features), and a group's
prefix is the longest run of ids its prompts share from the start, less at least one token so
every row has a suffix to generate from. The prefixes are prefilled once per group into a
`DynamicCache`, whose rows are then repeated for the group's questions, as vLLM's automatic prefix
caching does. A `PrefixStore` keeps each media's last prefix for later batches (a volume's
questions split over two batches, or asked one at a time): they reuse the run of it they share.

Layout: prefixes are left-padded to the longest prefix, suffixes left-padded after it, so a row
reads `[pads, prefix][pads, suffix]`; the attention mask hides both runs of pads and positions are
counted over unmasked tokens (as `generate` counts them), so every real token has the position,
the keys it attends to and hence the answer it has in the plain left-padded batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Layers = list[tuple]  # per LLM layer: (keys, values), each (1, kv_heads, P, head_dim)


class PrefixStore:
    """The last prefix prefilled for each media key (its ids and keys / values), the most recent
    `size` keys: a later batch asking about the same media reuses as much of it as its prompts
    share (a batch of one question too), as vLLM's prefix cache outlives a request."""

    def __init__(self, size: int = 32):
        self.size = size
        self._entries: OrderedDict[Hashable, tuple[list[int], Layers]] = OrderedDict()

    def lookup(self, key: Hashable, prompts: list[Sequence[int]]) -> tuple[int, Layers] | None:
        """(P, its layers) for the longest stored run of ids that every prompt starts with, less
        at least one token per prompt; None when there is none."""
        if key not in self._entries:
            return None
        ids, layers = self._entries[key]
        shared = min(_common_prefix_length([ids, *prompts]), min(len(p) for p in prompts) - 1)
        if shared <= 0:
            return None
        self._entries.move_to_end(key)
        return shared, [(k[:, :, :shared], v[:, :, :shared]) for k, v in layers]

    def put(self, key: Hashable, ids: list[int], layers: Layers) -> None:
        self._entries[key] = (ids, layers)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class PrefixPlan:
    """Which rows share a prefix: `group_of_row[r]` indexes the per-group lists. A group's prefix
    is `prefix_lengths[g]` tokens of row `first_row[g]`; `stored[g]` holds its keys / values when
    a `PrefixStore` had them, else it is prefilled; `keys[g]` is the group's media key."""

    group_of_row: list[int]
    prefix_lengths: list[int]
    first_row: list[int]
    keys: list[Hashable]
    stored: list[Layers | None]

    def tokens_saved(self) -> int:
        """Prefix tokens not computed again: each group's prefix once per row, less once for the
        groups that are prefilled."""
        fresh = sum(p for p, s in zip(self.prefix_lengths, self.stored) if s is None)
        return sum(self.prefix_lengths[g] for g in self.group_of_row) - fresh


def plan_shared_prefixes(prompts: Sequence[Sequence[int]], media: Sequence[Hashable],
                         store: PrefixStore | None = None) -> PrefixPlan | None:
    """A plan when some rows with media (a non-empty key) share it and a prefix, or a `store`
    holds a prefix of theirs or will keep one; None otherwise (the plain batch is as fast)."""
    groups: dict[Hashable, list[int]] = {}
    for row, key in enumerate(media):
        groups.setdefault(key if key else ("row", row), []).append(row)
    plan = PrefixPlan([0] * len(prompts), [], [], [], [])
    for g, (key, rows) in enumerate(groups.items()):
        rows_prompts = [prompts[r] for r in rows]
        found = store.lookup(key, rows_prompts) if store is not None and media[rows[0]] else None
        if found is None:
            length = min(_common_prefix_length(rows_prompts), min(len(p) for p in rows_prompts) - 1)
        else:
            length = found[0]
        plan.prefix_lengths.append(length)
        plan.first_row.append(rows[0])
        plan.keys.append(key if media[rows[0]] else None)
        plan.stored.append(None if found is None else found[1])
        for r in rows:
            plan.group_of_row[r] = g
    if min(plan.prefix_lengths) == 0:  # a one-token prompt: nothing to prefill before it
        return None
    will_store = store is not None and any(k is not None for k in plan.keys)
    return plan if plan.tokens_saved() > 0 or will_store else None


# Reuse runs a second forward (the prefixes) and copies keys / values into the batch's cache: it
# pays only when it spares a good share of the batch's prefill. At batch 1 decoding dominates (a
# prompt's prefill is a few percent of 32 new tokens), and measured on the benchmark's model the
# store alone saved nothing at batch 1 (3D, 256 image tokens) and cost up to 0.79x on 2D.
MIN_SHARED_FRACTION = 0.25


def reuse_pays(plan: PrefixPlan | None, prompts: Sequence[Sequence[int]]) -> bool:
    """Whether `plan` is worth running instead of the plain left-padded batch (the same answers
    either way): several rows, and prefix tokens not prefilled again at least
    `MIN_SHARED_FRACTION` of the batch's prompt tokens."""
    if plan is None or len(prompts) < 2:
        return False
    return plan.tokens_saved() >= MIN_SHARED_FRACTION * sum(len(p) for p in prompts)


def _common_prefix_length(prompts: list[Sequence[int]]) -> int:
    first = prompts[0]
    length = min(len(p) for p in prompts)
    for other in prompts[1:]:
        n = 0
        while n < length and other[n] == first[n]:
            n += 1
        length = n
    return length


def _prefill_groups(model, plan: PrefixPlan, groups: list[int], inputs_embeds, lengths: list[int]) -> list[Layers]:
    """Each of `groups`' prefixes (taken from the left-padded batch `inputs_embeds`) prefilled in
    one left-padded batch -> their keys / values without the padding."""
    longest = max(plan.prefix_lengths[g] for g in groups)
    embeds = inputs_embeds.new_zeros((len(groups), longest, inputs_embeds.shape[-1]))
    mask = inputs_embeds.new_zeros((len(groups), longest), dtype=torch.long)
    for i, g in enumerate(groups):
        row, p = plan.first_row[g], plan.prefix_lengths[g]
        start = inputs_embeds.shape[1] - lengths[row]
        embeds[i, longest - p:] = inputs_embeds[row, start:start + p]
        mask[i, longest - p:] = 1
    cache = model.prefill(embeds, mask)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return [[(k[i:i + 1, :, longest - plan.prefix_lengths[g]:], v[i:i + 1, :, longest - plan.prefix_lengths[g]:])
             for k, v in layers] for i, g in enumerate(groups)]


def _batch_cache(model, per_group: list[Layers], plan: PrefixPlan, rows):
    """A DynamicCache (B, kv_heads, longest prefix, head_dim) a layer: each row's group prefix,
    left-padded with zeros (the attention mask hides them)."""
    from transformers import DynamicCache

    longest = max(plan.prefix_lengths)
    cache = DynamicCache(config=model.llm.config)
    for index in range(len(per_group[0])):
        keys, values = [], []
        for g, layers in enumerate(per_group):
            k, v = layers[index]
            pad = (0, 0, longest - plan.prefix_lengths[g], 0)
            keys.append(F.pad(k, pad))
            values.append(F.pad(v, pad))
        cache.update(torch.cat(keys)[rows], torch.cat(values)[rows], index)
    return cache


def generate_with_plan(model, plan: PrefixPlan, inputs_embeds, attention_mask, store: PrefixStore | None = None,
                       prompts: Sequence[Sequence[int]] | None = None, **generation_kwargs):
    """(B, new) generated ids for the left-padded batch `inputs_embeds` (B, L, width) /
    `attention_mask` (B, L), each group's prefix prefilled once or taken from `store` (see the
    module doc); the prefixes prefilled are kept in `store` (with their ids from `prompts`)."""
    lengths = attention_mask.sum(-1).tolist()  # rows are left-padded: row r's tokens are its last lengths[r]
    per_group: list[Layers | None] = list(plan.stored)
    fresh = [g for g, layers in enumerate(per_group) if layers is None]
    if fresh:
        for g, layers in zip(fresh, _prefill_groups(model, plan, fresh, inputs_embeds, lengths)):
            per_group[g] = layers
            if store is not None and plan.keys[g] is not None:
                store.put(plan.keys[g], list(prompts[plan.first_row[g]][:plan.prefix_lengths[g]]), layers)
    rows = torch.tensor(plan.group_of_row, device=inputs_embeds.device)
    cache = _batch_cache(model, per_group, plan, rows)

    # The prefix part of these embeddings is never read: `generate` starts after the cache.
    longest_prefix, total = max(plan.prefix_lengths), inputs_embeds.shape[1]
    longest_suffix = max(n - plan.prefix_lengths[g] for n, g in zip(lengths, plan.group_of_row))
    embeds = inputs_embeds.new_zeros((len(lengths), longest_prefix + longest_suffix, inputs_embeds.shape[-1]))
    mask = attention_mask.new_zeros((len(lengths), longest_prefix + longest_suffix))
    for r, (n, g) in enumerate(zip(lengths, plan.group_of_row)):
        prefix, suffix = plan.prefix_lengths[g], n - plan.prefix_lengths[g]
        mask[r, longest_prefix - prefix:longest_prefix] = 1
        embeds[r, embeds.shape[1] - suffix:] = inputs_embeds[r, total - suffix:]
        mask[r, mask.shape[1] - suffix:] = 1
    return model.generate(inputs_embeds=embeds, attention_mask=mask, cache=cache, **generation_kwargs)
