"""The one micro-batch sampler of every stage: pretraining, SFT rows, preference pairs, evaluation.

A stage's data is a stream of positions 0, 1, 2, ... over its dataset: position p is item p mod N, in a
seeded permutation per epoch (epoch e = positions e*N .. (e+1)*N - 1) when shuffled. Global batch k holds
positions [k*G, (k+1)*G), and rank r of D takes the r-th contiguous slice of `micro_batch_size` of each
micro-batch group, as megatron's pretraining sampler does. So the union over ranks does not depend on D
(a DP2 run sees exactly the samples of one process), and `consumed_samples` alone is the data position a
checkpoint records: a resumed run continues exactly.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import numpy as np
import torch

LM_KEYS = ("tokens", "labels", "loss_mask")  # what next-token batches hold (megatron's datasets return more)


def stack(items: Sequence[dict], keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Items of equal-shaped tensors -> one batch, every key or only `keys`."""
    return {k: torch.stack([item[k] for item in items]) for k in (keys or items[0])}


def stack_lm(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    return stack(items, LM_KEYS)


class MicroBatches:
    """Endless iterator over one data-parallel rank's micro-batches, from `consumed_samples` on.

    `collate` turns the micro-batch's items into tensors (preference pairs: chosen rows, then rejected);
    `pad_multiple` > 0 cuts the batch after its longest row, rounded up to that multiple
    (megaflow.data.packing.trim_padding), and counts the shapes for the engine's throughput."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0, seed: int = 0, shuffle: bool = False, pad_multiple: int = 0,
                 collate: Callable[[Sequence[dict]], dict] = stack):
        self.dataset, self.mbs, self.dp_rank, self.dp_size = dataset, micro_batch_size, dp_rank, dp_size
        self.consumed_samples, self.seed, self.shuffle = consumed_samples, seed, shuffle
        self.pad_multiple, self.collate = pad_multiple, collate
        self.shapes: Counter = Counter()  # (rows, length) -> micro-batches yielded so far, when cutting
        self._epoch, self._order = None, None

    def __iter__(self):
        return self

    def item_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return int(self._order[offset])

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed_samples + self.dp_rank * self.mbs
        items = [self.dataset[self.item_at(start + j)] for j in range(self.mbs)]
        self.consumed_samples += self.mbs * self.dp_size
        batch = self.collate(items)
        if self.pad_multiple:
            from megaflow.data.packing import trim_padding

            batch = trim_padding(batch, self.pad_multiple)
            self.shapes[tuple(batch["tokens"].shape)] += 1
        return batch

    def take_shapes(self) -> Counter:
        """(rows, length) -> count of the micro-batches yielded since the last call (the engine's measure of
        the work of a step whose rows were cut); empty when rows are not cut."""
        shapes, self.shapes = self.shapes, Counter()
        return shapes
