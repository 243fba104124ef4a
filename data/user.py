"""A user's own dataset: a config with `_target_` naming a class or function that returns a
map-style torch.utils.data.Dataset of (input, label) pairs for one split (docs/models.md).

It is called with `args` and, where it names them, `split` ("train" or "val": the held-out one,
which must not overlap the training one) and `seed`. Its task follows from its samples: integer
token windows with next-token labels of the same shape are language modelling (vocabulary:
dataset.vocab_size); one label per sample is classification (dataset.num_classes classes, inputs
of dataset.input_shape). The pre-launch checks build both splits and read a batch of each.
"""

from __future__ import annotations

import inspect
import json

import torch
from torch.utils.data import Dataset, default_collate

from data.spec import DataSpec
from experiments.config.schema import ConfigError, DatasetConfig
from experiments.config.targets import call, locate


def build_user_dataset(cfg: DatasetConfig, seed: int, split: str) -> Dataset:
    fn = locate("dataset", cfg._target_)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: pass neither
        params = {}  # type: ignore[assignment]
    given = {k: v for k, v in (("split", split), ("seed", seed)) if k in params}
    ds = call(f"dataset={cfg.name} (split={split})", cfg._target_, cfg.args, given)
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise ConfigError(
            f"dataset._target_={cfg._target_} returned a {type(ds).__name__}, not a map-style "
            "torch.utils.data.Dataset (with __getitem__ and __len__)"
        )
    return ds


# Specs already read, by config: the checks and the setup ask more than once.
_SPECS: dict[str, DataSpec] = {}


def user_spec(cfg: DatasetConfig, train: Dataset | None = None) -> DataSpec:
    """The task and shapes, read off the first training sample (of `train`, when the caller has
    built that split already); checked against the config."""
    key = json.dumps([cfg._target_, cfg.args, cfg.input_shape, cfg.num_classes, cfg.vocab_size], default=str)
    if key not in _SPECS:
        _SPECS[key] = _spec(cfg, train if train is not None else build_user_dataset(cfg, 0, "train"))
    return _SPECS[key]


def _spec(cfg: DatasetConfig, ds: Dataset) -> DataSpec:
    if len(ds) == 0:  # type: ignore[arg-type]
        raise ConfigError(f"dataset={cfg.name}: its training split holds no sample")
    x, y = _pair(cfg, ds[0])
    if not x.is_floating_point() and y.shape == x.shape and x.dim() == 1:
        return DataSpec("lm", tuple(x.shape), vocab_size=cfg.vocab_size, seq_len=x.shape[0])
    if y.dim() != 0:
        raise ConfigError(
            f"dataset={cfg.name}: a sample's label has shape {list(y.shape)}; classification needs one "
            "label per sample, language modelling a label per token of an integer window"
        )
    if list(x.shape) != list(cfg.input_shape):
        shape = ",".join(map(str, x.shape))
        raise ConfigError(
            f"dataset={cfg.name} gives inputs of shape {list(x.shape)}, but dataset.input_shape="
            f"{list(cfg.input_shape)}; set dataset.input_shape=[{shape}]"
        )
    return DataSpec("classify", tuple(x.shape), num_classes=cfg.num_classes)


def _pair(cfg: DatasetConfig, sample: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(sample, tuple | list) or len(sample) != 2:
        raise ConfigError(
            f"dataset={cfg.name}: a sample must be an (input, label) pair, not {type(sample).__name__}"
        )
    return torch.as_tensor(sample[0]), torch.as_tensor(sample[1])


def check_user_dataset(cfg: DatasetConfig, seed: int, batch: int) -> None:
    """Both splits build; the training one holds a batch; a batch of each collates, with labels
    the model can predict."""
    train = build_user_dataset(cfg, seed, "train")
    spec = user_spec(cfg, train)
    for split, ds in (("train", train), ("val", build_user_dataset(cfg, seed, "val"))):
        n = len(ds)  # type: ignore[arg-type]
        if split == "train" and n < batch:
            raise ConfigError(
                f"dataset={cfg.name} holds {n} training samples, fewer than one batch (train.global_batch_size={batch})"
            )
        if n == 0:
            continue
        _, y = default_collate([ds[i] for i in range(min(n, batch))])
        limit, key = (
            (spec.vocab_size, "vocab_size") if spec.task == "lm" else (spec.num_classes, "num_classes")
        )
        if y.is_floating_point() or y.min() < 0 or y.max() >= limit:
            raise ConfigError(
                f"dataset={cfg.name} ({split}) has labels from {y.min().item()} to {y.max().item()}; "
                f"they must be integers in [0, dataset.{key}={limit})"
            )
