"""The one place that turns a strategy and a world size into parallel degrees and a DeviceMesh."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from experiments.config import ConfigError, StrategyConfig

# Outer to inner: pipeline stages talk least often, tensor-parallel ranks most, so TP gets the
# innermost (fastest-varying, same-node) ranks.
DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Degrees:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def as_dict(self) -> dict[str, int]:
        return {d: getattr(self, d) for d in DIMS}


def resolve_degrees(strategy: StrategyConfig, world_size: int) -> Degrees:
    """Degrees for `strategy` on `world_size` ranks: configured tp/pp, the `fill` dim takes the rest."""
    from parallel.registry import get_spec

    spec = get_spec(strategy.name)
    if spec.fill is None:
        if world_size != 1:
            raise ConfigError(
                f"strategy={strategy.name} runs in one process, but the launcher starts {world_size}; "
                "set launcher.nproc_per_node=1 launcher.nnodes=1 (or launcher=local)"
            )
        return Degrees()
    configured = {
        "tp": strategy.tp if "tp" in spec.configured else 1,
        "pp": strategy.pp if "pp" in spec.configured else 1,
    }
    for dim, value in configured.items():
        if value < 1:
            raise ConfigError(f"strategy.{dim}={value} must be >= 1")
    for dim in ("tp", "pp"):
        if dim not in spec.configured and dim != spec.fill and getattr(strategy, dim) != 1:
            raise ConfigError(
                f"strategy={strategy.name} does not use strategy.{dim}={getattr(strategy, dim)}; "
                f"drop it, or pick a strategy with {dim} (e.g. strategy=fsdp_tp or strategy=ddp_pp)"
            )
    rest = math.prod(configured.values())
    if world_size % rest:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp×pp = {rest} for strategy={strategy.name}; "
            f"use a world size that is a multiple of {rest}"
        )
    degrees = dict(configured)
    degrees[spec.fill] = world_size // rest
    return Degrees(**degrees)


def build_mesh(degrees: Degrees, device_type: str) -> DeviceMesh:
    shape = tuple(getattr(degrees, d) for d in DIMS)
    return init_device_mesh(device_type, shape, mesh_dim_names=DIMS)


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """This rank's index among the data-parallel replicas/shards, and their number."""
    coord = dict(zip(DIMS, mesh.get_coordinate() or (0,) * len(DIMS), strict=True))
    shard = mesh["dp_shard"].size()
    return coord["dp_replicate"] * shard + coord["dp_shard"], mesh["dp_replicate"].size() * shard
