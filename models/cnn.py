"""Small conv net for 28×28 and 32×32 images; global pooling makes it size-agnostic."""

from __future__ import annotations

from torch import nn

from models.staged import StagedModel


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(4, cout), nn.ReLU())


class CNN(StagedModel):
    def __init__(self, in_channels: int, channels: int, layers: int, num_classes: int) -> None:
        super().__init__()
        self.stem = _conv_block(in_channels, channels, 1)
        # Downsample in every block; GroupNorm (not BatchNorm) keeps samples independent, so data
        # parallelism computes exactly what one process computes on the whole batch.
        self.blocks = nn.ModuleDict(
            {str(i): _conv_block(channels * 2**i, channels * 2 ** (i + 1), 2) for i in range(layers)}
        )
        width = channels * 2**layers
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
