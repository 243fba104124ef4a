"""Token streams for language models: a synthetic Markov stream, or the bytes of a local text file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

BYTE_VOCAB = 256


def markov_stream(length: int, vocab_size: int, seed: int) -> Tensor:
    """Each token has two likely successors (90/10), so next-token loss can fall well below log(V)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab_size, (vocab_size, 2), generator=g).tolist()
    picks = (torch.rand(length, generator=g) < 0.1).long().tolist()
    # Plain Python lists: a tensor index per token costs ~30x more.
    stream = [0] * length
    for i in range(1, length):
        stream[i] = successors[stream[i - 1]][picks[i]]
    return torch.tensor(stream, dtype=torch.long)


def split_tail(stream: Tensor, seq_len: int, held_out: int) -> tuple[Tensor, Tensor]:
    """The stream without its tail, and the tail: `held_out` windows (and the last one's target).

    No token of the tail is ever read by a training window, as input or as target.
    """
    cut = len(stream) - (held_out * seq_len + 1)
    return stream[:cut], stream[cut:]


def text_stream(path: Path) -> Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()


class TokenWindows(Dataset):
    """Non-overlapping windows of `seq_len` tokens, targets shifted by one."""

    def __init__(self, stream: Tensor, seq_len: int) -> None:
        self.stream, self.seq_len = stream, seq_len
        self.n = (len(stream) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int | list[int] | Tensor) -> tuple[Tensor, Tensor]:
        """One window, or a batch of them for a list or tensor of indices."""
        starts = torch.as_tensor(i).reshape(-1, 1) * self.seq_len
        rows = self.stream[starts + torch.arange(self.seq_len + 1)]
        x, y = rows[:, :-1], rows[:, 1:]
        return (x[0], y[0]) if isinstance(i, int) else (x, y)
