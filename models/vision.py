"""torchvision's classifiers, randomly initialised, cut into stem → blocks → head where the
architecture is a sequence of blocks, so that FSDP shards each block and a pipeline can split them.

An architecture that is no such sequence (ViT, GoogLeNet, Inception, ShuffleNet) is returned as
torchvision builds it: it runs under every strategy that needs no plan of the model.
"""

from __future__ import annotations

import torchvision
from torch import nn

from experiments.config.schema import ConfigError
from models.cnn import image_channels
from models.norm import norm_layer
from models.staged import StagedModel

# arch prefix -> (the child holding the sequence of blocks, the child run before it, if any)
SEQUENCES = {
    "regnet": ("trunk_output", "stem"),
    "maxvit": ("blocks", "stem"),
    "mnasnet": ("layers", None),
}
# Where model.norm=group can replace the BatchNorm2d the blocks use (their norm_layer).
RESNETS = ("resnet", "resnext", "wide_resnet")
# Models whose training forward returns auxiliary classifiers' logits as well, unless told not to.
AUX_LOGITS = ("googlenet", "inception_v3")


def torchvision_model(
    arch: str, input_shape: tuple[int, ...], num_classes: int, norm: str = "batch"
) -> nn.Module:
    archs = torchvision.models.list_models(module=torchvision.models)
    if arch not in archs:
        raise ConfigError(
            f"model.arch={arch} is not a torchvision classifier; choose one of "
            f"torchvision.models.list_models(module=torchvision.models), e.g. resnet50, vit_b_16, convnext_tiny"
        )
    channels = image_channels(input_shape, f"torchvision model.arch={arch}")
    builder = torchvision.models.get_model_builder(arch)
    kwargs: dict[str, object] = {"weights": None, "num_classes": num_classes}
    if arch.startswith("vit_"):
        kwargs["image_size"] = input_shape[-1]
    if arch in AUX_LOGITS:
        kwargs |= {"aux_logits": False, "init_weights": True}
    if arch.startswith(RESNETS):
        kwargs["norm_layer"] = norm_layer(norm)
    elif norm == "group":  # batch and sync_batch (a strategy's conversion) apply to any BatchNorm
        raise ConfigError(f"model.norm=group applies to the ResNet family, not model.arch={arch}")
    net = builder(**kwargs)
    if channels != 3:
        _first_conv_takes(net, channels)
    return _staged(net, arch) or net


def _first_conv_takes(net: nn.Module, channels: int) -> None:
    """The first convolution, rebuilt for `channels` input channels (MNIST's one)."""
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d):
            parent, _, attr = name.rpartition(".")
            new = nn.Conv2d(
                channels,
                conv.out_channels,
                conv.kernel_size,  # type: ignore[arg-type]
                conv.stride,  # type: ignore[arg-type]
                conv.padding,  # type: ignore[arg-type]
                bias=conv.bias is not None,
            )
            setattr(net.get_submodule(parent) if parent else net, attr, new)
            return


class Staged(StagedModel):
    def __init__(self, stem: nn.Module | None, blocks: dict[str, nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleDict(blocks)
        self.head = head


def _staged(net: nn.Module, arch: str) -> StagedModel | None:
    if hasattr(net, "layer4"):  # the ResNet family: its forward is spelled out, so cut it so
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        blocks = {f"layer{i}": getattr(net, f"layer{i}") for i in range(1, 5)}
        return Staged(stem, blocks, nn.Sequential(net.avgpool, nn.Flatten(), net.fc))
    seq, before = next((v for k, v in SEQUENCES.items() if arch.startswith(k)), ("features", None))
    sequence = getattr(net, seq, None)
    if not isinstance(sequence, nn.Sequential | nn.ModuleList):
        return None
    stem = getattr(net, before) if before else None
    # The head is torchvision's own forward with the stem and the blocks taken out, so whatever
    # it does after them (pooling, flattening, a final norm) is exactly what torchvision does.
    setattr(net, seq, nn.Identity())
    if before:
        setattr(net, before, nn.Identity())
    return Staged(stem, {str(i): block for i, block in enumerate(sequence)}, net)
