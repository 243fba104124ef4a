"""Optimizer and learning-rate schedule from train.* keys."""

from __future__ import annotations

import functools
import math

import torch

from experiments.config import TrainConfig
from parallel.base import OptimizerFactory

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "cosine")


def optimizer_class_and_kwargs(cfg: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    return torch.optim.AdamW, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}


def optimizer_factory(cfg: TrainConfig) -> OptimizerFactory:
    cls, kwargs = optimizer_class_and_kwargs(cfg)
    return functools.partial(cls, **kwargs)


def lr_lambda(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return 1.0


def lr_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_lambda, cfg))
