"""Models by name. Every model is a StagedModel (stem → blocks → head)."""

from __future__ import annotations

from data.spec import DataSpec
from experiments.config.schema import ConfigError, ModelConfig
from models.staged import StagedModel

MODELS = ("mlp", "cnn", "resnet18", "transformer")
IMAGE_MODELS = ("cnn", "resnet18")
TP_MODELS = ("mlp", "transformer")  # models that declare a tensor-parallel plan
# model.norm per model, first its default. sync_batch is BatchNorm that data-parallel strategies
# synchronise over their ranks (parallel/strategies/syncbn.py), so they compute what one process computes.
NORMS = {"cnn": ("group", "batch", "sync_batch"), "resnet18": ("batch", "sync_batch", "group")}


def num_blocks(cfg: ModelConfig) -> int:
    """Pipeline split points: the blocks a model is cut between."""
    return 4 if cfg.name == "resnet18" else cfg.layers


def check_model_fits_data(cfg: ModelConfig, spec: DataSpec) -> None:
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model '{cfg.name}'; choose one of: {', '.join(MODELS)}")
    if cfg.name == "transformer" and spec.task != "lm":
        raise ConfigError("model=transformer needs a token dataset; use dataset=tokens")
    if cfg.name != "transformer" and spec.task == "lm":
        raise ConfigError(f"model={cfg.name} classifies; for dataset=tokens use model=transformer")
    if cfg.name in IMAGE_MODELS and len(spec.input_shape) != 3:
        raise ConfigError(
            f"model={cfg.name} needs images (C, H, W) but the dataset gives shape {list(spec.input_shape)}; "
            "use dataset=mnist|cifar10|fake_images or dataset.input_shape=[3,32,32]"
        )


def norm_of(cfg: ModelConfig) -> str:
    """The model's normalisation: model.norm, or the model's default."""
    return cfg.norm or NORMS[cfg.name][0]


def build_model(cfg: ModelConfig, spec: DataSpec) -> StagedModel:
    check_model_fits_data(cfg, spec)
    if cfg.name == "mlp":
        from models.mlp import MLP

        return MLP(spec.input_shape, cfg.hidden, cfg.layers, cfg.ffn_mult, spec.num_classes)
    if cfg.name == "cnn":
        from models.cnn import CNN

        return CNN(spec.input_shape[0], cfg.channels, cfg.layers, spec.num_classes, norm_of(cfg))
    if cfg.name == "resnet18":
        from models.resnet import ResNet

        return ResNet(spec.num_classes, spec.input_shape[0], norm_of(cfg))
    from models.transformer import Transformer

    return Transformer(spec.vocab_size, spec.seq_len, cfg)
