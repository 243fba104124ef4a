"""Models by name. Every model is a StagedModel (stem → blocks → head)."""

from __future__ import annotations

from data.spec import DataSpec
from experiments.config.schema import ConfigError, ModelConfig
from models.staged import StagedModel

MODELS = ("mlp", "cnn", "resnet18", "transformer", "llama")
IMAGE_MODELS = ("cnn", "resnet18")
LM_MODELS = ("transformer", "llama")  # decoders: next-token prediction over dataset=tokens
TP_MODELS = ("mlp", "transformer", "llama")  # models that declare a tensor-parallel plan
SP_MODELS = LM_MODELS  # ... and sequence-parallel edges
# model.norm per model, first its default. sync_batch is BatchNorm that data-parallel strategies
# synchronise over their ranks (parallel/strategies/syncbn.py), so they compute what one process computes.
NORMS = {"cnn": ("group", "batch", "sync_batch"), "resnet18": ("batch", "sync_batch", "group")}


def num_blocks(cfg: ModelConfig) -> int:
    """Pipeline split points: the blocks a model is cut between."""
    return 4 if cfg.name == "resnet18" else cfg.layers


def check_model(cfg: ModelConfig) -> None:
    """The model's own shape rules, before anything is built."""
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model '{cfg.name}'; choose one of: {', '.join(MODELS)}")
    if cfg.name in LM_MODELS and cfg.hidden % cfg.heads:
        raise ConfigError(f"model.hidden={cfg.hidden} is not divisible by model.heads={cfg.heads}")
    if cfg.name == "llama":
        from models.llama import kv_heads_of

        if cfg.heads % kv_heads_of(cfg):
            raise ConfigError(
                f"model.kv_heads={cfg.kv_heads} must divide model.heads={cfg.heads} (each kv head serves "
                "as many query heads as every other)"
            )
        if (cfg.hidden // cfg.heads) % 2:
            raise ConfigError(
                f"model.hidden / model.heads = {cfg.hidden // cfg.heads} must be even: rotary positions turn pairs of features"
            )


def tp_split_sizes(cfg: ModelConfig) -> list[tuple[str, int]]:
    """What tensor parallelism splits, by its name in the config: the TP degree must divide each."""
    if cfg.name == "llama":
        from models.llama import ffn_hidden, kv_heads_of

        return [
            ("model.heads", cfg.heads),
            ("model.kv_heads", kv_heads_of(cfg)),
            ("the SwiGLU width", ffn_hidden(cfg.hidden, cfg.ffn_mult, cfg.multiple_of)),
        ]
    sizes = [("model.hidden", cfg.hidden), ("the MLP width ffn_mult×hidden", cfg.ffn_mult * cfg.hidden)]
    return sizes + ([("model.heads", cfg.heads)] if cfg.name == "transformer" else [])


def check_model_fits_data(cfg: ModelConfig, spec: DataSpec) -> None:
    check_model(cfg)
    if cfg.name in LM_MODELS and spec.task != "lm":
        raise ConfigError(f"model={cfg.name} needs a token dataset; use dataset=tokens")
    if cfg.name not in LM_MODELS and spec.task == "lm":
        raise ConfigError(
            f"model={cfg.name} classifies; for dataset=tokens use model={' or model='.join(LM_MODELS)}"
        )
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
    if cfg.name == "llama":
        from models.llama import Llama

        return Llama(spec.vocab_size, spec.seq_len, cfg)
    from models.transformer import Transformer

    return Transformer(spec.vocab_size, spec.seq_len, cfg)
