"""Models: whatever a model config's `_target_` builds (conf/model/*.yaml for the built-in ones,
a user's own config for theirs; docs/models.md).

Read first: staged.py, the protocol a model follows to run under every strategy. Then one model
(mlp.py is the smallest). A model's constructor takes its config's keys as arguments, and the
dataset's shapes it names (DATA_FIELDS) are passed to it, so one config fits every dataset.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from data.spec import DataSpec
from experiments.config.schema import ConfigError, ModelConfig
from experiments.config.targets import call, locate

# What a model receives from the dataset when its constructor names it (and the config does not).
DATA_FIELDS = ("input_shape", "num_classes", "vocab_size", "seq_len")
# Models whose blocks take and give model.hidden features per position (per sample for the MLP):
# the communication predictions of TP and pipelines read their width from the config.
HIDDEN_WIDTH = ("models.mlp.MLP", "models.transformer.Transformer", "models.llama.Llama")
# Decoders whose model.hidden the resource check's advice may lower in whole, even-sized heads.
HEADED = ("models.transformer.Transformer", "models.llama.Llama")


def model_target(cfg: ModelConfig) -> Callable[..., nn.Module]:
    return locate("model", cfg.target)


def _data_args(fn: Callable[..., nn.Module], cfg: ModelConfig, spec: DataSpec) -> dict[str, object]:
    """The dataset's shapes `fn` asks for; a config key `fn` does not take is an error here."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: trust the config
        return {}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in cfg.args:
            if key not in params and not key.startswith("_"):
                near = difflib.get_close_matches(key, list(params), n=1)
                hint = f"did you mean {near[0]}? " if near else ""
                where = f" (set in {cfg.source})" if cfg.source else ""
                raise ConfigError(
                    f"model.{key}{where}: {cfg.target} takes no argument '{key}'; {hint}"
                    f"it takes: {', '.join(p for p in params if p != 'self')}"
                )
    for key, value in cfg.args.items():
        kind = _simple_type(params[key].annotation) if key in params else None
        if kind is not None and not _fits(kind, value):
            raise ConfigError(f"model.{key}={value!r} must be {kind.__name__} (an argument of {cfg.target})")
    wants = [k for k in DATA_FIELDS if k in params and k not in cfg.args]
    _check_task(cfg, spec, wants)
    return {k: getattr(spec, k) for k in wants}


def _check_task(cfg: ModelConfig, spec: DataSpec, wants: list[str]) -> None:
    """What a model asks of the dataset says what it reads: a vocabulary, token windows; classes,
    labelled samples."""
    if "vocab_size" in wants and spec.task != "lm":
        raise ConfigError(
            f"model={cfg.label} reads token windows (it takes vocab_size), which only dataset=tokens gives"
            "; use dataset=tokens"
        )
    if "num_classes" in wants and spec.task == "lm":
        raise ConfigError(
            f"model={cfg.label} classifies (it takes num_classes); for dataset=tokens use a decoder: "
            "model=transformer|llama|moe"
        )


def _simple_type(annotation: object) -> type | None:
    """int, float, bool or str, when a parameter is annotated so (others are trusted)."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return {"int": int, "float": float, "bool": bool, "str": str}.get(name)  # type: ignore[arg-type]


def _fits(kind: type, value: object) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """The config's `_target_` called with its keys and the dataset's shapes it names."""
    fn = model_target(cfg)
    model = call(f"model={cfg.label}", cfg.target, cfg.args, _data_args(fn, cfg, spec))
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_={cfg.target} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def meta_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """The model on the meta device: shapes, parameter counts and FLOPs without memory. A model
    whose constructor reads tensor values (torchvision's RegNet sizes its blocks so) is built on
    the CPU and moved."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return build_model(cfg, spec)
    except ConfigError as e:
        if "meta tensor" not in str(e):
            raise
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        return build_model(cfg, spec).to("meta")


def check_model_fits_data(cfg: ModelConfig, spec: DataSpec, dataset: str) -> nn.Module:
    """Build the model on the meta device and run a batch of two through it: it must give one
    logit per class (per token, for a language model). Returns the meta model."""
    model = meta_model(cfg, spec)
    x, _ = spec.example(2, "meta")
    try:
        out = model(x)
    except Exception as e:
        raise ConfigError(
            f"model={cfg.label} fails on a batch of dataset={dataset} (inputs {list(x.shape)}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    want = (2, spec.seq_len, spec.vocab_size) if spec.task == "lm" else (2, spec.num_classes)
    got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != list(want):
        what = "a logit per token and vocabulary entry" if spec.task == "lm" else "a logit per class"
        raise ConfigError(
            f"model={cfg.label} gives {got} for a batch of 2 of dataset={dataset}, which needs {list(want)} "
            f"({what}): {_fit_hint(spec)}"
        )
    return model


def _fit_hint(spec: DataSpec) -> str:
    if spec.task == "lm":
        return (
            "a classifier cannot read token windows; use model=transformer|llama|moe, or a decoder of yours"
        )
    return "a decoder cannot read these samples; use dataset=tokens, or a classifier (model=mlp|cnn|resnet18|torchvision)"
