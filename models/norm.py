"""The normalisation layer a conv model asks for by name (model.norm)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from experiments.config.schema import ConfigError

NORMS = ("batch", "sync_batch", "group")


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """channels -> layer. sync_batch builds BatchNorm; data parallelism converts it (parallel/strategies/syncbn.py)."""
    if kind not in NORMS:
        raise ConfigError(f"model.norm={kind} is not one of: {', '.join(NORMS)}")
    if kind == "group":
        return lambda c: nn.GroupNorm(min(4, c), c)
    return nn.BatchNorm2d
