"""Residual MLP; its blocks are the Megatron column→row pair, so it has a TP plan."""

from __future__ import annotations

import math

from torch import Tensor, nn

from models.staged import StagedModel


class MLPBlock(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, ffn)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class MLP(StagedModel):
    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: int, layers: int, ffn_mult: int
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden))
        self.blocks = nn.ModuleDict({str(i): MLPBlock(hidden, ffn_mult * hidden) for i in range(layers)})
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, num_classes))
        self.sizes = [("model.hidden", hidden), ("the MLP width ffn_mult×hidden", ffn_mult * hidden)]

    def tp_plan(self, sequence_parallel: bool) -> dict[str, object]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        return {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}

    def tp_divisors(self) -> list[tuple[str, int]]:
        return self.sizes
