"""Megatron-style tensor parallelism with DTensor: each model declares its per-block plan."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from parallel.base import Parallelized, StrategyContext, module_forward_backward


def tensor_parallelize(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Apply the model's TP plan to each of its blocks, and its stem/head plan where it has one."""
    plan = model.tp_plan(sequence_parallel)
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, plan)
    if sequence_parallel:
        for name, style in model.sequence_parallel_edges().items():
            if getattr(model, name) is not None:
                parallelize_module(getattr(model, name), tp_mesh, style)


def apply_tp(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    tensor_parallelize(model, mesh["tp"], ctx.cfg.strategy.sequence_parallel)
    return Parallelized(model=model, forward_backward=module_forward_backward(model, ctx))
