"""Data order, sharding, and the real torchvision loaders on tiny files written in the real formats."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from data import build_dataset, make_loader
from data.checks import check_files
from data.sampler import ShardedBatchSampler
from experiments.config.schema import ConfigError, DatasetConfig


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_ranks_together_see_exactly_the_single_process_batches(dp_size):
    single = iter(ShardedBatchSampler(40, 8, 0, 1, seed=3, shuffle=True))
    shards = [iter(ShardedBatchSampler(40, 8, r, dp_size, seed=3, shuffle=True)) for r in range(dp_size)]
    for _ in range(12):  # crosses epoch boundaries (5 batches per epoch)
        assert sum((next(s) for s in shards), []) == next(single)


def test_synthetic_is_deterministic_and_labels_are_varied():
    cfg = DatasetConfig(name="synthetic", num_samples=512, input_shape=[8], num_classes=4)
    a, b = build_dataset(cfg, seed=1), build_dataset(cfg, seed=1)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert len(torch.unique(a.tensors[1])) == 4


def test_token_windows_batch_and_single_index_agree():
    cfg = DatasetConfig(name="tokens", num_samples=64, seq_len=8, vocab_size=16)
    ds = build_dataset(cfg, seed=0)
    xb, yb = ds[[3, 5]]
    x, y = ds[5]
    assert torch.equal(xb[1], x) and torch.equal(yb[1], y) and torch.equal(x[1:], y[:-1])
    xl, yl = next(iter(make_loader(ds, cfg, 8, 1, 2, seed=0)))
    assert xl.shape == (4, 8) and yl.shape == (4, 8)


def test_tokens_read_a_local_text_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello paralab, " * 20)
    cfg = DatasetConfig(name="tokens", text_file=str(text), seq_len=8)
    check_files(cfg)
    ds = build_dataset(cfg, seed=0)
    x, y = ds[0]
    assert bytes(x.tolist()) == b"hello pa" and bytes(y.tolist()) == b"ello par"
    # The last tenth of the file's windows is the held-out tail (tests/test_eval.py).
    windows = (len(text.read_bytes()) - 1) // 8
    held_out = len(build_dataset(cfg, seed=0, split="val"))
    assert held_out == windows // 10 and windows - 1 <= len(ds) + held_out <= windows
    with pytest.raises(ConfigError, match="not found"):
        check_files(DatasetConfig(name="tokens", text_file=str(tmp_path / "missing.txt")))


def _write_idx(path, magic, dims, data: bytes):
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + data)


def test_mnist_reads_idx_files_from_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n = 6
    images = np.arange(n * 28 * 28, dtype=np.uint8).tobytes()
    labels = bytes([3, 1, 4, 1, 5, 9])
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, (n, 28, 28), images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, (n,), labels)
    cfg = DatasetConfig(name="mnist", root=str(tmp_path), input_shape=[1, 28, 28])
    check_files(cfg)
    ds = build_dataset(cfg, seed=0)
    x, y = ds[2]
    assert len(ds) == n and x.shape == (1, 28, 28) and y == 4
    xb, yb = next(iter(make_loader(ds, cfg, 4, 1, 2, seed=0)))
    assert xb.shape == (2, 1, 28, 28) and yb.dtype == torch.int64


def test_cifar10_reads_pickled_batches_from_root(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    cfg = DatasetConfig(name="cifar10", root=str(tmp_path), input_shape=[3, 32, 32], verify_checksums=False)
    check_files(cfg)
    ds = build_dataset(cfg, seed=0)
    x, y = ds[5]
    assert len(ds) == 20 and x.shape == (3, 32, 32) and y == 1
    # With checksums on (the default), torchvision rejects files that are not the published ones.
    with pytest.raises(RuntimeError, match="corrupted"):
        build_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)), seed=0)


class _Payload:
    """What a crafted batch carries: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_a_crafted_cifar_batch_runs_no_code_even_with_checksums_off(tmp_path):
    test_cifar10_reads_pickled_batches_from_root(tmp_path)  # a root of real-format batches
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _Payload(str(marker)), "labels": [0]}))
    cfg = DatasetConfig(name="cifar10", root=str(tmp_path), input_shape=[3, 32, 32], verify_checksums=False)
    with pytest.raises(
        pickle.UnpicklingError, match=r"data_batch_3 is not a CIFAR-10 batch: it names posix\.mkdir"
    ):
        build_dataset(cfg, seed=0)
    assert not marker.exists()


def test_missing_files_name_the_root_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py/data_batch_1 not found.*download=true"):
        check_files(DatasetConfig(name="cifar10", root=str(tmp_path)))


def test_fake_images_are_deterministic():
    cfg = DatasetConfig(name="fake_images", num_samples=8, input_shape=[3, 32, 32])
    a, b = build_dataset(cfg, seed=2)[3], build_dataset(cfg, seed=2)[3]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[0].shape == (3, 32, 32)
