"""The protocol a model may follow to run under every strategy: stem → named blocks → head.

Any nn.Module runs under the strategies that need no plan of the model (single, dp, ddp, zero,
fsdp, deepspeed). What the others need, a model declares here:
- `blocks` (an nn.ModuleDict): FSDP shards each block on its own; a pipeline cuts between them.
  Pipelining also needs `stem` and `head` (either may be None) and forward = stem → blocks → head,
  which StagedModel.forward is. Stages keep the block names of the full model, so checkpoints
  and parity checks line up across strategies.
- `tp_plan(sequence_parallel)`: the ParallelStyle plan applied to each block (tensor parallelism),
  with `tp_divisors()` naming the sizes the TP degree must divide, and
  `sequence_parallel_edges()` where the stem and head take part in sequence parallelism.
- `aux_loss()`: a loss the last forward computed beside the output (a router's load balancing),
  added to the training loss.
"""

from __future__ import annotations

from torch import Tensor, nn


class StagedModel(nn.Module):
    stem: nn.Module | None
    blocks: nn.ModuleDict
    head: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        if self.stem is not None:
            x = self.stem(x)
        for block in self.blocks.values():
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def tp_plan(self, sequence_parallel: bool) -> dict[str, object] | None:
        """Per-block ParallelStyle plan for tensor parallelism; None when the model has none. A
        pipeline stage calls it as its own (parallel/strategies/pipeline.py), so it may read the
        model's blocks, stem and head, and nothing else of it."""
        return None

    def tp_divisors(self) -> list[tuple[str, int]]:
        """(what, size) of each size the plan splits, named as the user sets it (`model.heads`)."""
        return []

    def aux_loss(self) -> Tensor | None:
        """The auxiliary loss of the last forward, to add to the training loss; None if none."""
        return None


def blocks_of(model: nn.Module) -> nn.ModuleDict | None:
    blocks = getattr(model, "blocks", None)
    return blocks if isinstance(blocks, nn.ModuleDict) else None


def tp_plan_of(model: nn.Module, sequence_parallel: bool = False) -> dict[str, object] | None:
    plan = getattr(model, "tp_plan", None)
    return plan(sequence_parallel) if callable(plan) and blocks_of(model) is not None else None


def aux_loss_of(model: nn.Module) -> Tensor | None:
    aux = getattr(model, "aux_loss", None)
    return aux() if callable(aux) else None
