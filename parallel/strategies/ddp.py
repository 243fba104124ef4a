"""DistributedDataParallel: a full replica per rank, bucketed gradient all-reduce overlapped with backward."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from parallel.base import Parallelized, StrategyContext, module_forward_backward
from parallel.strategies.syncbn import sync_batchnorm


def wrap_ddp(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> DistributedDataParallel:
    s = ctx.cfg.strategy
    sync_batchnorm(model, mesh["dp_replicate"].get_group(), ctx)
    return DistributedDataParallel(
        model,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        process_group=mesh["dp_replicate"].get_group(),
        bucket_cap_mb=s.bucket_cap_mb,
        gradient_as_bucket_view=s.gradient_as_bucket_view,
    )


def ddp_parallelized(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext, **extra) -> Parallelized:
    """What every strategy that trains through DDP hands the loop (ddp, zero1)."""
    ddp = wrap_ddp(model, mesh, ctx)
    return Parallelized(
        model=model,
        forward_backward=module_forward_backward(ddp, ctx, ddp.no_sync),
        replay_on_resume=True,
        **extra,
    )


def apply_ddp(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    return ddp_parallelized(model, mesh, ctx)
