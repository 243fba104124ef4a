"""One process, one device: the reference every other strategy is checked against."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.base import Parallelized, StrategyContext, module_forward_backward


def apply_single(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    return Parallelized(model=model, forward_backward=module_forward_backward(model, ctx))
