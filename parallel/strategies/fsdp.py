"""FSDP2 (fully_shard): ZeRO-3 when parameters are resharded after forward, ZeRO-2 when they are kept."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from models.staged import blocks_of
from parallel.base import Parallelized, StrategyContext, fsdp_no_sync, module_forward_backward
from parallel.mesh import expert_meshes, flat, fsdp_mesh
from parallel.strategies.syncbn import sync_batchnorm

# fp32 is no cast: the parameters' own dtype, which train.precision=fp64 makes float64.
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def shard_model(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> None:
    """fully_shard each block, then the root: one all-gather per block, overlapped with compute.

    The shard group is dp_shard, joined by the context-parallel ranks (parallel/mesh.py). Replica
    groups (dp_replicate > 1) make it HSDP: FSDP2 on a (replicate, shard) mesh shards over the
    inner dim and replicates across the outer, all-reducing each reduced gradient shard across
    the replicas. With strategy.ep > 1 the experts are split over the ep ranks first (expert.py)."""
    s = ctx.cfg.strategy
    replicate = mesh["dp_replicate"].size() > 1
    dp_mesh = fsdp_mesh(mesh, replicate)
    data_ranks = flat(mesh, "dp_replicate", "dp_shard") if replicate else mesh["dp_shard"]
    sync_batchnorm(model, data_ranks.get_group(), ctx)
    kwargs = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=DTYPES[s.mp_param_dtype], reduce_dtype=DTYPES[s.mp_reduce_dtype]
        ),
        # strategy.offload (CUDA only, checked before launch): sharded parameters, their gradients
        # and the optimizer's step live in pinned host memory; FSDP copies each block's to the GPU.
        "offload_policy": CPUOffloadPolicy() if s.offload else OffloadPolicy(),
    }
    if s.ep > 1:
        from parallel.strategies.expert import apply_ep

        experts_mesh, ep_mesh = expert_meshes(mesh, s.ep, replicate)
        apply_ep(
            model, ep_mesh, kwargs | {"mesh": experts_mesh, "reshard_after_forward": s.reshard_after_forward}
        )
    # A model without blocks (models/staged.py) is one FSDP unit: its root.
    for block in (blocks_of(model) or {}).values():
        fully_shard(block, reshard_after_forward=s.reshard_after_forward, **kwargs)
    # The root's own parameters (stem, head) stay gathered from forward into backward, as FSDP2
    # does by default: backward starts with the head, so resharding it would cost one more
    # all-gather per step for nothing (predict.fsdp_comm counts it so).
    fully_shard(model, reshard_after_forward=False, **kwargs)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    """FSDP, and HSDP where the mesh has replica groups (strategy=hsdp)."""
    shard_model(model, mesh, ctx)
    return Parallelized(
        model=model,
        forward_backward=module_forward_backward(model, ctx, functools.partial(fsdp_no_sync, model)),
    )
