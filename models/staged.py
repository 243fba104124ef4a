"""The shape every paralab model has: stem → named blocks → head.

Pipeline stages keep a subset of the blocks (and the stem on the first stage, the head on the last);
the block names stay those of the full model, so checkpoints and parity checks line up across
strategies.
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
        """Per-block ParallelStyle plan for tensor parallelism; None when the model has none."""
        return None
