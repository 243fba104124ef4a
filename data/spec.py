"""What a model needs to know about its data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class DataSpec:
    task: str  # "classify" (one label per sample) | "lm" (next-token prediction)
    input_shape: tuple[int, ...]
    num_classes: int = 0
    vocab_size: int = 0
    seq_len: int = 0

    def example(self, n: int, device: str) -> tuple[Tensor, Tensor]:
        """A batch of n samples of the right shapes and dtypes (zeros), e.g. on the meta device."""
        if self.task == "lm":
            x = torch.zeros((n, self.seq_len), dtype=torch.long, device=device)
            return x, torch.zeros((n, self.seq_len), dtype=torch.long, device=device)
        x = torch.zeros((n, *self.input_shape), device=device)
        return x, torch.zeros(n, dtype=torch.long, device=device)


def loss_fn_for(spec: DataSpec):
    """The training loss of the task, in fp32 whatever the model computes in: cross-entropy over
    classes, or over the vocabulary at every position."""
    if spec.task == "lm":
        return lambda logits, y: F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    return lambda logits, y: F.cross_entropy(logits.float(), y)
