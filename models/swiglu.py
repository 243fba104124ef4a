"""Llama's SwiGLU feed-forward, shared by its dense blocks and by each expert of a mixture."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def ffn_hidden(dim: int, ffn_mult: int, multiple_of: int, dim_multiplier: float = 1.0) -> int:
    """Llama's SwiGLU width: two thirds of ffn_mult·dim (the same parameters as a GELU MLP of
    ffn_mult·dim), times Llama 3's ffn_dim_multiplier, rounded up to a multiple of `multiple_of`."""
    return multiple_of * math.ceil(int(dim_multiplier * int(2 * ffn_mult * dim / 3)) / multiple_of)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
