"""The training sampler: per-file weights and length grouping, deterministic per (seed, epoch).

Weights: a file of weight w contributes w times its records to an epoch (the integer part as
whole copies, the fraction as a random subset drawn anew each epoch). Length grouping: indices
are shuffled, cut into mega-batches of 50 batches, each sorted by length, so a batch holds
samples of similar length and little padding. The order depends only on (seed, epoch), which
is what lets a resumed run see the same data order as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

MEGABATCH = 50


class WeightedLengthGroupedSampler(torch.utils.data.Sampler[int]):
    def __init__(self, lengths: Sequence[int], source_indices: Sequence[int], weights: Sequence[float],
                 batch_size: int, group_by_length: bool, seed: int):
        self.lengths = list(lengths)
        self.source_indices = list(source_indices)
        self.weights = list(weights)
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.seed = seed
        self.epoch = 0
        counts = [self.source_indices.count(i) for i in range(len(self.weights))]
        self._size = sum(round(w * n) for w, n in zip(self.weights, counts))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._size

    def _epoch_indices(self, generator: torch.Generator) -> list[int]:
        by_source: list[list[int]] = [[] for _ in self.weights]
        for index, source in enumerate(self.source_indices):
            by_source[source].append(index)
        chosen: list[int] = []
        for members, weight in zip(by_source, self.weights):
            target = round(weight * len(members))
            whole, rest = divmod(target, len(members)) if members else (0, 0)
            chosen.extend(members * whole)
            if rest:
                pick = torch.randperm(len(members), generator=generator)[:rest].tolist()
                chosen.extend(members[i] for i in pick)
        order = torch.randperm(len(chosen), generator=generator).tolist()
        return [chosen[i] for i in order]

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = self._epoch_indices(generator)
        if not self.group_by_length:
            return iter(indices)
        size = MEGABATCH * self.batch_size
        grouped: list[int] = []
        for start in range(0, len(indices), size):
            mega = sorted(indices[start:start + size], key=lambda i: self.lengths[i], reverse=True)
            grouped.extend(mega)
        return iter(grouped)
