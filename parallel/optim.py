"""Optimizer and learning-rate schedule from train.* keys."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from experiments.config.schema import TrainConfig


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer class and its arguments: ZeRO-1 needs them apart to build its local shards."""

    cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return self.cls(params, **self.kwargs)


def optimizer_spec(cfg: TrainConfig) -> OptimizerSpec:
    if cfg.optimizer == "sgd":
        return OptimizerSpec(
            torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
        )
    return OptimizerSpec(torch.optim.AdamW, {"lr": cfg.lr, "weight_decay": cfg.weight_decay})


def lr_lambda(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return 1.0


def lr_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_lambda, cfg))
