"""Global batches in one order for every world size; each data-parallel rank takes its slice."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this rank's indices of each global micro-batch, forever (epoch after epoch).

    The permutation depends only on the seed and epoch, and rank r takes the r-th contiguous slice,
    so the union over ranks of one step is exactly the batch a single process would see.
    """

    def __init__(
        self,
        n: int,
        global_micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        start: int = 0,
    ) -> None:
        if n < global_micro_batch:
            raise ValueError(f"dataset has {n} samples, fewer than one batch of {global_micro_batch}")
        self.n, self.batch, self.seed, self.shuffle = n, global_micro_batch, seed, shuffle
        self.local = global_micro_batch // dp_size
        self.offset = dp_rank * self.local
        self.start = start  # micro-batches already drawn (a resumed run continues the same stream)

    def __iter__(self) -> Iterator[list[int]]:
        return (idx.tolist() for idx in self.index_batches())

    def index_batches(self) -> Iterator[torch.Tensor]:
        """The same batches as index tensors, for datasets that index a whole batch at once."""
        per_epoch = self.n // self.batch
        epoch, skip = divmod(self.start, per_epoch)
        while True:
            if self.shuffle:
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                order = torch.arange(self.n)
            for start in range(skip * self.batch, self.n - self.batch + 1, self.batch):
                yield order[start + self.offset : start + self.offset + self.local]
            epoch, skip = epoch + 1, 0


def eval_index_batches(
    n: int, global_batch: int, dp_rank: int, dp_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of each held-out batch, in order, and which of its rows are real samples.

    Every rank runs the same number of batches of the same shape (a pipeline's stages and FSDP's
    collectives need that): the last global batch is filled up with copies of sample 0 that weigh
    nothing, so each of the n samples counts exactly once, whatever divides what.
    """
    local = global_batch // dp_size
    for start in range(0, n, global_batch):
        idx = torch.arange(start + dp_rank * local, start + (dp_rank + 1) * local)
        real = idx < n
        yield torch.where(real, idx, 0), real
