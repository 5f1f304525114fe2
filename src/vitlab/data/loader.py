"""A batched loader: images in memory as one uint8 tensor, or on disk (data.stored: streamed or cached).

No per-sample Python: a batch is one index gather (or one read of those images from disk, a few
batches ahead) and one call to a batched transform. The order
of epoch e is a permutation seeded by (seed, e); batch i's augmentation is seeded by
(seed, e, i, rank). So any batch can be rebuilt from those numbers alone, which is what makes
resuming mid-epoch exact: the loader's state is just (epoch, next batch).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..errors import ConfigError
from . import ImageSet


def batch_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (seed, epoch, batch, rank): independent streams per position."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class BatchLoader:
    """Batches of (inputs, targets) from `data`.

    Training (`train=True`): reshuffled every epoch, every rank gets an equal share
    (`rank::world_size` of the permutation), incomplete last batch dropped. Evaluation: in order,
    sharded the same way, nothing dropped. One transform signature for both:
    `transform(images_u8, labels, gen) -> (inputs, targets)`; `gen` is None when evaluating.
    """

    def __init__(self, data: ImageSet, batch_size: int, train: bool, transform: Callable, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        per_rank = len(data) // world_size if train else -(-len(data) // world_size)
        if train and per_rank < batch_size:
            raise ConfigError(f"batch_size={batch_size} per rank exceeds the {per_rank} training images each of "
                              f"{world_size} rank(s) gets from {len(data)}")
        self.data, self.batch_size, self.train, self.transform = data, batch_size, train, transform
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.start_batch = 0  # set when resuming mid-epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.data)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        g = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch))
        perm = torch.randperm(n, generator=g)
        perm = perm[: n - n % self.world_size]  # equal shares: DDP steps in lockstep
        return perm[self.rank::self.world_size]

    def __len__(self) -> int:
        n = len(self._indices()) if not self.train else (len(self.data) // self.world_size)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        images, labels = self.data.images, self.data.labels
        order = range(self.start_batch, len(self))
        sels = [idx[i * self.batch_size:(i + 1) * self.batch_size] for i in order]
        # images on disk (data.stored) are read a few batches ahead, by worker processes if streamed
        gathered = images.batches(sels) if hasattr(images, "batches") else (images[sel] for sel in sels)
        for i, sel, x in zip(order, sels, gathered):
            y = labels[sel]
            if self.train:
                gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, i, self.rank))
                yield self.transform(x, y, gen)
            else:
                yield self.transform(x, y, None)
        self.start_batch = 0
