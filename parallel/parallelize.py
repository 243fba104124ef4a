"""A model and a mesh in, the Parallelized the loop trains out: the levers, the context-parallel
ring and the strategy, applied in the one order they compose in."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.base import Parallelized, StrategyContext
from parallel.levers import apply_ac, apply_compile
from parallel.mesh import Degrees
from parallel.registry import StrategySpec


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    degrees: Degrees,
    ctx: StrategyContext,
    spec: StrategySpec,
    seq_len: int,
) -> Parallelized:
    t = ctx.cfg.train
    # Before the strategy: its hooks (FSDP's all-gather) then wrap the recomputed region.
    apply_ac(model, t.ac, t.ac_every)
    if t.compile:
        apply_compile(model)
    # Attention becomes a ring and positions this rank's before any strategy wraps the modules;
    # the sequences are split around whatever forward and backward the strategy runs.
    split = None
    if degrees.cp > 1:
        from parallel.strategies.context import apply_cp

        split = apply_cp(model, mesh["cp"], seq_len, ctx.device)
    par = spec.apply(model, mesh, ctx)
    return split(par) if split is not None else par
