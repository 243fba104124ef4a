"""nn.DataParallel: one process scatters each batch over the visible GPUs and gathers the outputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.base import Parallelized, StrategyContext, module_forward_backward


def apply_dp(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    gpus = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    notes = []
    if gpus < 2:
        notes.append(
            f"DataParallel has nothing to split: {gpus} GPU(s) visible, the whole batch runs on {ctx.device}"
        )
    wrapped = nn.DataParallel(model, device_ids=list(range(gpus)) or None)
    return Parallelized(model=model, forward_backward=module_forward_backward(wrapped, ctx), notes=notes)
