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
    else:
        notes.append(
            f"DataParallel over {gpus} GPUs: its copies (scatter, weight broadcast, gather) go through "
            "torch.cuda.comm, not c10d, so comm/ counts none of them; memory is the largest of the GPUs' peaks"
        )
    wrapped = nn.DataParallel(_Autocast(model, ctx), device_ids=list(range(gpus)) or None)
    return Parallelized(
        model=model,
        forward_backward=module_forward_backward(wrapped, ctx),
        notes=notes,
        devices_per_rank=max(1, gpus),
    )


class _Autocast(nn.Module):
    """Enters the run's autocast inside each replica's forward.

    DataParallel runs replicas in threads, re-entering autocast there without a dtype; autocast's
    dtype is per thread (fp16 by default), so bf16 would silently become fp16 with no scaler.
    """

    def __init__(self, module: nn.Module, ctx: StrategyContext) -> None:
        super().__init__()
        self.module, self.ctx = module, ctx

    def forward(self, *args, **kwargs):
        with self.ctx.autocast():
            return self.module(*args, **kwargs)
