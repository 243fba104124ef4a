"""Small conv net for 28×28 and 32×32 images; global pooling makes it size-agnostic."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from experiments.config.schema import ConfigError
from models.norm import norm_layer
from models.staged import StagedModel


def _conv_block(cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), norm(cout), nn.ReLU())


class CNN(StagedModel):
    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, channels: int, layers: int, norm: str = "group"
    ) -> None:
        super().__init__()
        # GroupNorm (the default) keeps samples independent, so data parallelism computes exactly
        # what one process computes on the whole batch; BatchNorm does so only when synchronised.
        make = norm_layer(norm)
        self.stem = _conv_block(image_channels(input_shape, "cnn"), channels, 1, make)
        # Downsample in every block.
        self.blocks = nn.ModuleDict(
            {str(i): _conv_block(channels * 2**i, channels * 2 ** (i + 1), 2, make) for i in range(layers)}
        )
        width = channels * 2**layers
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def image_channels(input_shape: tuple[int, ...], model: str) -> int:
    if len(input_shape) != 3:
        raise ConfigError(
            f"model={model} needs images (C, H, W) but the dataset gives shape {list(input_shape)}; "
            "use dataset=mnist|cifar10|fake_images or dataset.input_shape=[3,32,32]"
        )
    return input_shape[0]
