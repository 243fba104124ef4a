"""Causal self-attention's core, and token positions: the two places a model meets the sequence
dimension, so context parallelism can split it (parallel/strategies/context.py).

A model that attends through `CausalAttention`, reads positions through `ReadsPositions` and
takes statistics over a sequence through `ReadsWholeSequence` runs under context parallelism
unchanged: the strategy gives each such module this rank's positions or the means over the whole
sequence, and swaps the attention core for a ring over the ranks that hold the rest of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ReadsPositions:
    """A module that reads each token's position in its sequence."""

    # This rank's positions where it holds part of each sequence; None: the whole, 0 .. s-1.
    positions: Tensor | None = None

    def token_positions(self, s: int, device: torch.device) -> Tensor:
        return torch.arange(s, device=device) if self.positions is None else self.positions


class ReadsWholeSequence:
    """A module whose output needs a mean over each whole sequence (a router's load statistics)."""

    # Means over this rank's part of each sequence -> means over the whole; None: it holds the whole.
    whole_sequence_mean: Callable[[Tensor], Tensor] | None = None


class CausalAttention(nn.Module):
    """softmax(q·kᵀ/√d + causal mask)·v over q (batch, heads, seq, head_dim) and k, v with
    heads / `repeats` heads each: kv head j serves query heads j·repeats .. (j+1)·repeats − 1."""

    def __init__(self, repeats: int = 1) -> None:
        super().__init__()
        self.repeats = repeats

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.repeats > 1:
            k, v = k.repeat_interleave(self.repeats, dim=1), v.repeat_interleave(self.repeats, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def has_attention(model: nn.Module) -> bool:
    return any(isinstance(m, CausalAttention) for m in model.modules())
