"""The parallel degrees and the DeviceMesh built from them, and the axis each process group serves.
How a strategy and a world size give the degrees is its registry entry's to say
(parallel/registry.py, resolve_degrees)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# Outer to inner: pipeline stages talk least often, tensor-parallel ranks most, so TP gets the
# innermost (fastest-varying, same-node) ranks; context parallelism's ring next to it, as torchtitan.
DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# Expert parallelism is not a dim of its own: it splits dp_shard into (dp_shard / ep, ep), so the
# ranks that share experts are data-parallel ranks (torchtitan's layout).
EP_DIMS = ("dp_shard_mod_ep", "ep")
# Where a collective runs on every rank of the job (the default group), its axis is this.
WORLD = "world"


@dataclass(frozen=True)
class Degrees:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1  # inside dp_shard: not a factor of the world size

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Ranks that take different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep

    @property
    def experts_fsdp(self) -> int:
        """Ranks FSDP shards each rank's experts over: the rest of dp_shard, and the cp ranks."""
        return self.dp_shard_mod_ep * self.cp

    @property
    def fsdp(self) -> int:
        """Ranks FSDP shards parameters over: its shard group and the context-parallel ranks, which
        hold the same parameters for other tokens of the same samples."""
        return self.dp_shard * self.cp

    def as_dict(self) -> dict[str, int]:
        return {d: getattr(self, d) for d in (*DIMS, "ep")}

    def axis(self, *dims: str) -> str:
        """The name the communication counter gives a group over `dims` (flattened if several):
        `world` where it spans every rank, as torch then hands out the default group."""
        if self.world_size > 1 and math.prod(getattr(self, d) for d in dims) == self.world_size:
            return WORLD
        return "_".join(dims)


# Process group name -> the mesh axis it serves, for the communication counter.
_AXES: dict[str, str] = {}


def _register(mesh: DeviceMesh, name: str) -> None:
    group = mesh.get_group()
    if group != dist.group.WORLD:
        _AXES[group.group_name] = name


def axis_of(group_name: str) -> str:
    """The axis a process group serves (`world` for the default group, `other` if unknown); also
    once the process group is destroyed (a failure's diagnosis reads it then)."""
    return _AXES.get(group_name, "other")


def build_mesh(degrees: Degrees, device_type: str) -> DeviceMesh:
    shape = tuple(getattr(degrees, d) for d in DIMS)
    _AXES[dist.group.WORLD.group_name] = WORLD  # type: ignore[union-attr]
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=DIMS)
    for d in DIMS:
        _register(mesh[d], d)
    return mesh


def flat(mesh: DeviceMesh, *dims: str) -> DeviceMesh:
    """The 1D mesh over `dims` of the world mesh (one dim: itself)."""
    if len(dims) == 1:
        return mesh[dims[0]]
    name = "_".join(dims)
    out = mesh[dims]._flatten(name)
    _register(out, name)
    return out


def fsdp_mesh(mesh: DeviceMesh, replicate: bool = False) -> DeviceMesh:
    """FSDP's mesh: its shard group, joined by the context-parallel ranks where there are some;
    (replicate, shard) for HSDP."""
    shard = flat(mesh, "dp_shard", "cp") if mesh["cp"].size() > 1 else mesh["dp_shard"]
    if not replicate:
        return shard
    return mesh["dp_replicate", shard.mesh_dim_names[0]]  # type: ignore[index]


def expert_meshes(mesh: DeviceMesh, ep: int, replicate: bool) -> tuple[DeviceMesh, DeviceMesh]:
    """FSDP's mesh for the experts, and the ep mesh that splits them. dp_shard is split into
    (dp_shard / ep, ep), from the same root as `mesh`, so FSDP2 can shard the experts' DTensors
    again: over dp_shard / ep and the context-parallel ranks (which route their own tokens to the
    same experts), replicated across dp_replicate where `replicate` (HSDP)."""
    shard = mesh["dp_shard"].size()
    out = mesh._unflatten("dp_shard", (shard // ep, ep), EP_DIMS)
    for d in EP_DIMS:
        _register(out[d], d)
    dims = ("dp_shard_mod_ep", "cp") if mesh["cp"].size() > 1 else ("dp_shard_mod_ep",)
    experts = flat(out, *dims)
    if replicate:  # a flattened dim (with cp) is the root's to slice by name
        name = experts.mesh_dim_names[0]  # type: ignore[index]
        experts = (mesh if len(dims) > 1 else out)["dp_replicate", name]
    return experts, out["ep"]


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """This rank's index among the data-parallel replicas/shards, and their number. Context- and
    tensor-parallel ranks of one replica read the same samples."""
    coord = dict(zip(DIMS, mesh.get_coordinate() or (0,) * len(DIMS), strict=True))
    shard = mesh["dp_shard"].size()
    return coord["dp_replicate"] * shard + coord["dp_shard"], mesh["dp_replicate"].size() * shard
