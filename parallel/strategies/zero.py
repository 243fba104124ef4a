"""ZeRO-1: DDP gradients, optimizer state sharded with torch's ZeroRedundancyOptimizer."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.optim import ZeroRedundancyOptimizer

from parallel.base import Parallelized, StrategyContext
from parallel.optim import OptimizerSpec
from parallel.strategies.ddp import ddp_parallelized


def apply_zero1(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    group = mesh["dp_replicate"].get_group()

    def make_optimizer(module: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
        # Each rank keeps state only for the parameters assigned to it, steps them, and broadcasts
        # the updated values to the other ranks.
        return ZeroRedundancyOptimizer(
            module.parameters(), optimizer_class=spec.cls, process_group=group, **spec.kwargs
        )

    return ddp_parallelized(model, mesh, ctx, make_optimizer=make_optimizer)
