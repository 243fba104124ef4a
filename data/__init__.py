"""Datasets by name (or a user's, by `_target_`: user.py), their DataSpec, and per-data-parallel-rank loaders."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from data.sampler import ShardedBatchSampler
from data.spec import DataSpec
from data.tokens import TokenWindows
from experiments.config.schema import ConfigError, DatasetConfig

DATASETS = ("synthetic", "tokens", "mnist", "cifar10", "fake_images")


def dataset_spec(cfg: DatasetConfig, train: Dataset | None = None) -> DataSpec:
    """The shapes a dataset yields, known without loading it (a user's: from its first sample,
    of `train` where the caller has built the training split already)."""
    if cfg._target_:
        from data.user import user_spec

        return user_spec(cfg, train)
    if cfg.name not in DATASETS:
        raise ConfigError(
            f"unknown dataset '{cfg.name}'; choose one of: {', '.join(DATASETS)}, or give a _target_ of your own"
        )
    if cfg.name == "tokens":
        from data.tokens import BYTE_VOCAB

        vocab = BYTE_VOCAB if cfg.text_file else cfg.vocab_size
        return DataSpec("lm", (cfg.seq_len,), vocab_size=vocab, seq_len=cfg.seq_len)
    return DataSpec("classify", tuple(cfg.input_shape), num_classes=cfg.num_classes)


def memory_bytes(cfg: DatasetConfig) -> int:
    """Bytes a rank holds for the datasets it builds in memory (training and held-out splits):
    synthetic's float inputs, the Markov stream as Python ints while it is drawn. Files and
    generated images are read sample by sample: 0 here."""
    n = cfg.num_samples + cfg.val_samples
    if cfg._target_ or cfg.name not in ("synthetic", "tokens"):
        return 0
    if cfg.name == "synthetic":
        return n * (4 * math.prod(cfg.input_shape) + 8)
    return 0 if cfg.text_file else n * cfg.seq_len * 32  # a list slot, a pick and the tensor


SPLITS = ("train", "val")
# A text file's held-out tail: this share of its windows (at least one).
TEXT_HELD_OUT = 0.1


def text_held_out(n_tokens: int, seq_len: int) -> int:
    """Windows at the end of a text file kept for evaluation: its last tenth, at least one."""
    return max(1, int((n_tokens - 1) // seq_len * TEXT_HELD_OUT))


def build_dataset(cfg: DatasetConfig, seed: int, split: str = "train") -> Dataset:
    """The training split, or the held-out one (`val`), which no training batch ever draws from.

    synthetic: more inputs from the same teacher; tokens: the stream's tail; mnist/cifar10: their
    test split; fake_images: images seeded after the training ones.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split} is not one of {SPLITS}")
    val = split == "val"
    if cfg._target_:
        from data.user import build_user_dataset

        return build_user_dataset(cfg, seed, split)
    if cfg.name == "synthetic":
        from data.synthetic import teacher_dataset

        held_out = cfg.val_samples if val else 0
        return teacher_dataset(cfg.num_samples, tuple(cfg.input_shape), cfg.num_classes, seed, held_out)
    if cfg.name == "tokens":
        from data.tokens import TokenWindows, markov_stream, split_tail, text_stream

        if cfg.text_file:
            stream = text_stream(Path(cfg.text_file).expanduser())
            held_out = text_held_out(len(stream), cfg.seq_len)
        else:
            held_out = cfg.val_samples
            stream = markov_stream((cfg.num_samples + held_out) * cfg.seq_len + 2, cfg.vocab_size, seed)
        head, tail = split_tail(stream, cfg.seq_len, held_out)
        return TokenWindows(tail if val else head, cfg.seq_len)
    from data.vision import vision_dataset

    return vision_dataset(cfg, seed, val)


def take(dataset: Dataset, idx: Tensor) -> tuple[Tensor, Tensor]:
    """The samples at `idx`, as one batch."""
    if isinstance(dataset, TensorDataset | TokenWindows):
        return dataset[idx]
    return default_collate([dataset[i] for i in idx.tolist()])


def make_loader(
    dataset: Dataset,
    cfg: DatasetConfig,
    global_micro_batch: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    start: int = 0,
) -> Iterable[tuple[Tensor, Tensor]]:
    sampler = ShardedBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        global_micro_batch,
        dp_rank,
        dp_size,
        seed,
        cfg.shuffle,
        start,
    )
    if isinstance(dataset, TensorDataset | TokenWindows) and cfg.num_workers == 0:
        # In-memory tensors index a whole batch at once: one gather, no DataLoader machinery.
        return (take(dataset, idx) for idx in sampler.index_batches())
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers)
