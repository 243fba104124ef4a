"""Held-out evaluation under any strategy: weighted sums over the data-parallel shards, one all-reduce.

Each data-parallel rank takes its slice of every held-out batch; the ranks that hold the model's
output (the last pipeline stage, the first rank of each tensor-parallel group) add up the loss, the
correct predictions and the sample count of the real samples in it. One all-reduce of those three
sums gives every rank the whole split's mean loss and accuracy: a weighted sum, not a mean of
per-rank means, so a split that divides neither the world nor the batch is still counted exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from data import take
from data.sampler import eval_index_batches
from data.spec import DataSpec
from parallel.base import Parallelized, StrategyContext


@dataclass(frozen=True)
class EvalResult:
    step: int
    wall_s: float  # training seconds before this evaluation (evaluations left out): time to quality
    eval_s: float
    val_loss: float
    val_acc: float | None  # classification
    val_ppl: float | None  # language modelling

    def scalars(self) -> dict[str, float]:
        from experiments.measure.record import Tag

        out = {Tag.VAL_LOSS: self.val_loss}
        if self.val_acc is not None:
            out[Tag.VAL_ACC] = self.val_acc
        if self.val_ppl is not None:
            out[Tag.VAL_PPL] = self.val_ppl
        return out


def _sums(logits: Tensor, y: Tensor, real: Tensor) -> Tensor:
    """[loss sum, correct, count] over the real samples of a batch, in float64."""
    logits = logits.float()
    if logits.dim() == 3:  # language model: every token of a real window counts
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        correct = logits.argmax(-1) == y
        weight = real.view(-1, 1).expand_as(y)
    else:
        loss = F.cross_entropy(logits, y, reduction="none")
        correct = logits.argmax(-1) == y
        weight = real
    w = weight.double()
    return torch.stack([(loss.double() * w).sum(), (correct.double() * w).sum(), w.sum()])


class Evaluator:
    def __init__(
        self,
        dataset: Dataset,
        spec: DataSpec,
        par: Parallelized,
        ctx: StrategyContext,
        dp_rank: int,
        dp_size: int,
        tp_rank: int,
    ) -> None:
        t = ctx.cfg.train
        size = len(dataset)  # type: ignore[arg-type]
        self.n = size if t.eval_samples < 0 else min(t.eval_samples, size)
        self.dataset, self.spec, self.par, self.ctx = dataset, spec, par, ctx
        self.every, self.last = t.eval_every, t.steps
        # The training step's global batch: a pipeline's stages were shaped by it.
        self.batch, self.dp_rank, self.dp_size = t.global_batch_size, dp_rank, dp_size
        # Tensor-parallel ranks hold the same output: one of them counts it (context-parallel
        # ranks hold different tokens of it: each counts its own).
        self.counts = par.holds_loss and tp_rank == 0
        self.device = ctx.device

    def due(self, step: int) -> bool:
        return step == self.last or (self.every > 0 and step % self.every == 0)

    @torch.no_grad()
    def run(self, step: int, wall_s: float) -> EvalResult:
        t0 = time.perf_counter()
        model = self.par.model
        model.eval()
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        try:
            for idx, real in eval_index_batches(self.n, self.batch, self.dp_rank, self.dp_size):
                x, y = take(self.dataset, idx)
                x, y = self.ctx.inputs(x).to(self.device), y.to(self.device)
                with self.ctx.autocast():
                    out = self.par.eval_forward(x, y)
                if out is not None and self.counts:
                    if self.par.local_targets is not None:
                        y = self.par.local_targets(y)
                    total += _sums(out, y, real.to(self.device))
        finally:
            model.train()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        loss_sum, correct, count = total.tolist()
        loss = loss_sum / count
        lm = self.spec.task == "lm"
        return EvalResult(
            step=step,
            wall_s=wall_s,
            eval_s=time.perf_counter() - t0,
            val_loss=loss,
            val_acc=None if lm else correct / count,
            val_ppl=math.exp(loss) if lm else None,
        )
