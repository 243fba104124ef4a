"""Deterministic, learnable classification data: Gaussian inputs labelled by a fixed random teacher."""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset


def teacher_dataset(
    num_samples: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    held_out: int = 0,
) -> TensorDataset:
    """The training samples, or with `held_out` > 0 that many more inputs labelled by the same teacher.

    The held-out inputs are the generator's next draws after the teacher, so they are never among
    the training inputs, and the training set is the same whether or not they are drawn.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, *input_shape, generator=g)
    dim = math.prod(input_shape)
    w1 = torch.randn(dim, 64, generator=g) / math.sqrt(dim)
    w2 = torch.randn(64, num_classes, generator=g) / 8.0
    if held_out:
        x = torch.randn(held_out, *input_shape, generator=g)
    y = (torch.tanh(x.reshape(len(x), dim) @ w1) @ w2).argmax(dim=1)
    return TensorDataset(x, y)
