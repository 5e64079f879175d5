"""Training batches that a resumed fine-tuning run starts at any step without decoding the batches before it.

`StepBatches` fixes every training batch by the seed and its global batch number n alone. With B batches per
epoch (len // batch_size, the last partial batch dropped; one batch of everything when the dataset is no bigger
than a batch), batch n is batch b = n mod B of epoch e = n div B; epoch e visits the images in the order
torch.randperm(len) drawn from a generator seeded by (seed, e), and image i of epoch e is decoded and augmented
under the torch random state seeded by (seed, e, i), forked so that the process's own random state is left as it
was. So `steps(start)` computes the order of the batches before `start` (indices only) and decodes none of
them; a run resumed at step 36 sees the batches an uninterrupted one sees from step 36, and iterating a
StepBatches always gives the same batches from 0 on (fine-tuning's BatchNorm re-estimation reads those).

With several processes (rank, world) global batch n goes to process n mod world, as data.batches does. DataLoader
workers ignore SIGINT: a Ctrl-C in a terminal reaches the whole process group, and fine-tuning stops between two
steps (checkpoint first), which needs the workers still running.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import Batch, split_batch


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _ignore_sigint(worker: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Seeded(Dataset):
    """dataset[i] decoded under the torch random state seeded by `seed`, for items (i, seed)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class _Plan(Sampler):
    """This process's batches of (index, seed) items from global batch `start * world` on, forever."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, rank: int, world: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.rank, self.world = start, rank, world
        self.per_epoch = max(1, size // batch_size)
        self._epoch: tuple[int, list[int]] | None = None  # the last epoch's order

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n = self.start * self.world
        while True:
            if n % self.world == self.rank:
                yield self.batch(n)
            n += 1

    def batch(self, n: int) -> list[tuple[int, int]]:
        epoch, b = divmod(n, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(_seed(self.seed, epoch))
            self._epoch = epoch, torch.randperm(self.size, generator=generator).tolist()
        chosen = self._epoch[1][b * self.batch_size:(b + 1) * self.batch_size]
        return [(i, _seed(self.seed, epoch, i)) for i in chosen]


class StepBatches:
    """Shuffled, augmented training batches of `dataset`, each fixed by (seed, its global batch number); see the
    module docstring. `workers` processes decode images."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, workers: int = 0):
        if batch_size < 1 or len(dataset) < 1:
            raise ValueError(f"StepBatches needs a batch size and a dataset of at least 1, got {batch_size} and "
                             f"{len(dataset)} items")
        self.dataset, self.batch_size, self.seed, self.workers = dataset, batch_size, seed, workers

    def __len__(self) -> int:
        """Batches per epoch."""
        return max(1, len(self.dataset) // self.batch_size)

    def steps(self, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """This process's batches from step `start` on, forever; none of the earlier ones is decoded."""
        plan = _Plan(len(self.dataset), self.batch_size, self.seed, start, rank, world)
        loader = DataLoader(_Seeded(self.dataset), batch_sampler=plan, num_workers=self.workers,
                            worker_init_fn=_ignore_sigint if self.workers else None)
        for batch in loader:
            yield split_batch(batch)

    def __iter__(self) -> Iterator[Batch]:
        return self.steps()
