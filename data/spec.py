"""What a model needs to know about its data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    task: str  # "classify" (one label per sample) | "lm" (next-token prediction)
    input_shape: tuple[int, ...]
    num_classes: int = 0
    vocab_size: int = 0
    seq_len: int = 0
