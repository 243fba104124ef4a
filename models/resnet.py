"""torchvision's ResNet-18, regrouped into stem / layer1..4 / head so it can be pipelined."""

from __future__ import annotations

import torchvision
from torch import nn

from models.norm import norm_layer
from models.staged import StagedModel


class ResNet(StagedModel):
    def __init__(self, num_classes: int, in_channels: int, norm: str = "batch") -> None:
        super().__init__()
        net = torchvision.models.resnet18(weights=None, num_classes=num_classes, norm_layer=norm_layer(norm))
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.blocks = nn.ModuleDict({f"layer{i}": getattr(net, f"layer{i}") for i in range(1, 5)})
        self.head = nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
