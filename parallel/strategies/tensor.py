"""Megatron-style tensor parallelism with DTensor: each model declares its per-block plan."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate
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


class PartialGrads:
    """Reduce gradients that backward leaves as partial sums, once per step in one all-reduce.

    Under sequence parallelism each rank computes the norm weights' gradients from its slice of
    the sequence, so they arrive as Partial(sum). Left so, the optimizer would all-reduce each one
    separately, and no local norm of them means anything.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self) -> None:
        partial = [
            p
            for p in self.model.parameters()
            if isinstance(p.grad, DTensor) and any(isinstance(pl, Partial) for pl in p.grad.placements)
        ]
        if not partial:
            return
        mesh, placements = partial[0].grad.device_mesh, partial[0].grad.placements
        if any(p.grad.device_mesh != mesh or p.grad.placements != placements for p in partial):
            raise NotImplementedError("partial gradients on different meshes or placements")
        locals_ = [p.grad.to_local() for p in partial]
        flat = torch.cat([g.reshape(-1) for g in locals_])
        for dim, pl in enumerate(placements):
            if isinstance(pl, Partial):
                dist.all_reduce(flat, group=mesh.get_group(dim))
        whole = tuple(Replicate() if isinstance(pl, Partial) else pl for pl in placements)
        for p, g, chunk in zip(partial, locals_, flat.split([g.numel() for g in locals_]), strict=True):
            p.grad = DTensor.from_local(chunk.view_as(g), mesh, whole, run_check=False)


def apply_tp(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    sp = ctx.cfg.strategy.sequence_parallel
    tensor_parallelize(model, mesh["tp"], sp)
    return Parallelized(
        model=model,
        forward_backward=module_forward_backward(model, ctx),
        after_backward=PartialGrads(model) if sp else None,
    )
