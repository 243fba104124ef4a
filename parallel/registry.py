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


STRATEGIES: dict[str, StrategySpec] = {
    "single": StrategySpec("parallel.single:apply_single", None, shards="nothing (reference)"),
    "ddp": StrategySpec("parallel.ddp:apply_ddp", "dp_replicate", shards="nothing; all-reduces grads"),
}


def get_spec(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown strategy '{name}'; choose one of: {', '.join(STRATEGIES)}"
        ) from None
