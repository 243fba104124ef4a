"""The parallel degrees and the DeviceMesh built from them. How a strategy and a world size give
the degrees is its registry entry's to say (parallel/registry.py, resolve_degrees)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

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


def build_mesh(degrees: Degrees, device_type: str) -> DeviceMesh:
    shape = tuple(getattr(degrees, d) for d in DIMS)
    return init_device_mesh(device_type, shape, mesh_dim_names=DIMS)


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """This rank's index among the data-parallel replicas/shards, and their number."""
    coord = dict(zip(DIMS, mesh.get_coordinate() or (0,) * len(DIMS), strict=True))
    shard = mesh["dp_shard"].size()
    return coord["dp_replicate"] * shard + coord["dp_shard"], mesh["dp_replicate"].size() * shard
