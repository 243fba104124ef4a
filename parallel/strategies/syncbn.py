"""BatchNorm synchronised over the data-parallel ranks (model.norm=sync_batch).

Per-rank BatchNorm normalises each rank's slice with that slice's statistics, so data-parallel
training differs from one process on the whole batch. Synchronised, every rank normalises with the
global batch's mean and variance and updates the same running statistics, so DDP and FSDP compute
what one process computes, in training and in evaluation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from parallel.base import StrategyContext


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm's computation for CPU tensors (gloo), which torch's kernel and DDP refuse.

    The statistics are summed over the group with functional collectives' all_reduce, which is
    differentiable (its backward all-reduces the gradient; torch.distributed.nn's is deprecated),
    in two passes (the mean, then squared deviations from it) as a one-process batch_norm computes
    them; backward sums each statistic's gradient over the group in turn.
    In eval mode it is plain BatchNorm on the running statistics, which every rank holds alike.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, group: ProcessGroup) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            self.weight, self.bias = bn.weight, bn.bias
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(self, buf, getattr(bn, buf))
        self.group = group
        self.train(bn.training)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() // x.size(1), dtype=x.dtype, device=x.device)
        summed = funcol.all_reduce(torch.cat([x.sum(dims), count]), "sum", self.group)
        n, mean = summed[-1], summed[:-1] / summed[-1]
        centered = x - mean.view(shape)
        var = funcol.all_reduce(centered.square().sum(dims), "sum", self.group) / n
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * n / (n - 1), factor)
        return out


def _convert_cpu(module: nn.Module, group: ProcessGroup) -> None:
    """Replace every BatchNorm under `module` in place, keeping its parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlooSyncBatchNorm):
            setattr(module, name, GlooSyncBatchNorm(child, group))
        else:
            _convert_cpu(child, group)


def sync_batchnorm(module: nn.Module, group: ProcessGroup, ctx: StrategyContext) -> None:
    """Under model.norm=sync_batch, synchronise `module`'s BatchNorms over a data-parallel group."""
    if ctx.cfg.model.get("norm") != "sync_batch" or dist.get_world_size(group) == 1:
        return
    if ctx.device.type == "cpu":
        _convert_cpu(module, group)
    else:
        nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
