"""Every strategy by name: its apply_* function and how it uses the mesh."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from experiments.config import ConfigError


@dataclass(frozen=True)
class StrategySpec:
    apply: str  # "module:function", imported when the worker applies it
    # Mesh dim that takes the world size left after the configured degrees; None = one process only.
    fill: str | None
    configured: frozenset[str] = frozenset()  # degrees read from strategy.tp / strategy.pp
    needs_tp_plan: bool = False
    needs_stages: bool = False
    shards: str = ""  # for the README table and --help

    def load(self) -> Callable:
        module, fn = self.apply.split(":")
        return getattr(importlib.import_module(module), fn)


TP = frozenset({"tp"})
PP = frozenset({"pp"})
STRATEGIES: dict[str, StrategySpec] = {
    "single": StrategySpec("parallel.single:apply_single", None, shards="nothing: the reference run"),
    "dp": StrategySpec("parallel.dataparallel:apply_dp", None, shards="the batch over GPUs in one process"),
    "ddp": StrategySpec("parallel.ddp:apply_ddp", "dp_replicate", shards="the batch; grads all-reduced"),
    "zero1": StrategySpec("parallel.zero:apply_zero1", "dp_replicate", shards="the batch + optimizer state"),
    "fsdp": StrategySpec(
        "parallel.fsdp:apply_fsdp", "dp_shard", shards="the batch + optimizer state, grads, params"
    ),
    "zero2": StrategySpec(
        "parallel.fsdp:apply_fsdp", "dp_shard", shards="the batch + optimizer state, grads"
    ),
    "zero3": StrategySpec(
        "parallel.fsdp:apply_fsdp", "dp_shard", shards="the batch + optimizer state, grads, params"
    ),
    "tp": StrategySpec("parallel.tensor:apply_tp", "tp", needs_tp_plan=True, shards="each layer's weights"),
    "pp": StrategySpec(
        "parallel.pipeline:apply_pp", "pp", needs_stages=True, shards="layers; microbatches pipelined"
    ),
    "mp": StrategySpec(
        "parallel.pipeline:apply_mp", "pp", needs_stages=True, shards="layers; one batch at a time"
    ),
    "fsdp_tp": StrategySpec(
        "parallel.hybrid:apply_fsdp_tp",
        "dp_shard",
        TP,
        needs_tp_plan=True,
        shards="batch × FSDP, weights × TP",
    ),
    "ddp_pp": StrategySpec(
        "parallel.hybrid:apply_ddp_pp",
        "dp_replicate",
        PP,
        needs_stages=True,
        shards="batch × DDP, layers × PP",
    ),
    "fsdp_tp_pp": StrategySpec(
        "parallel.hybrid:apply_fsdp_tp_pp",
        "dp_shard",
        TP | PP,
        needs_tp_plan=True,
        needs_stages=True,
        shards="batch × FSDP, weights × TP, layers × PP",
    ),
}


def get_spec(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy '{name}'; choose one of: {', '.join(STRATEGIES)}") from None
