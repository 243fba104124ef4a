"""Data that cannot work, found before launch; and the one download, done before launch.

Checked here: files that are not there (a text file; the files torchvision reads); a token file
too short for one batch; MNIST idx files whose header does not match their size; CIFAR-10 batches
that fail their published MD5 (with dataset.verify_checksums=true); a dataset.input_shape or
num_classes that the real files do not have. Downloading runs once, in the job's process, before
any rank starts: ranks never download (they would race into one folder).
"""

from __future__ import annotations

import struct
from pathlib import Path

from data import dataset_spec
from experiments.config.schema import Config, ConfigError, DatasetConfig

# What the real files hold: the model is built from the config, so the config must say this.
REAL = {"mnist": ([1, 28, 28], 10), "cifar10": ([3, 32, 32], 10)}
MNIST_FILES = {  # file -> (idx magic, dims after the count)
    "MNIST/raw/train-images-idx3-ubyte": (2051, 2),
    "MNIST/raw/train-labels-idx1-ubyte": (2049, 0),
}
# Files torchvision itself looks for under the root (see MNIST.resources and CIFAR10.train_list).
# Both splits: the test split is the held-out one, and torchvision checks for it either way.
EXPECTED = {
    "mnist": [
        f"MNIST/raw/{s}-{k}-idx{d}-ubyte"
        for s in ("train", "t10k")
        for k, d in (("images", 3), ("labels", 1))
    ],
    "cifar10": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
    + ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"],
}


class DataUnavailable(RuntimeError):
    """The data could not be fetched (no network, a server error): a runtime fault, not a config error."""


def check_data(cfg: Config) -> None:
    d, batch = cfg.dataset, cfg.train.global_batch_size
    if d.args and not d._target_:
        raise ConfigError(
            f"dataset.args are the arguments of a dataset of your own (dataset._target_); dataset={d.name} takes none"
        )
    if d._target_:
        from data.user import check_user_dataset

        return check_user_dataset(d, cfg.seed, batch)
    dataset_spec(d)  # an unknown dataset
    if d.name in REAL:
        # Said first: a wrong shape is wrong wherever the files are.
        shape, classes = REAL[d.name]
        if list(d.input_shape) != shape or d.num_classes != classes:
            raise ConfigError(
                f"dataset={d.name} holds {classes} classes of shape {shape}; dataset.input_shape="
                f"{list(d.input_shape)} dataset.num_classes={d.num_classes} cannot change that"
            )
    check_files(d)
    if d.name == "tokens" and d.text_file:
        _check_text(Path(d.text_file).expanduser(), d.seq_len, batch)
    if d.download:
        return  # fetched (and checked by torchvision) before launch
    root = Path(d.root).expanduser()
    if d.name == "mnist":
        for name, (magic, dims) in MNIST_FILES.items():
            n = _idx_count(root / name, magic, dims)
            if n < batch:
                raise ConfigError(
                    f"{root / name} holds {n} samples, fewer than one batch (train.global_batch_size={batch})"
                )
    if d.name == "cifar10" and d.verify_checksums:
        _check_cifar_md5(root)


def check_files(d: DatasetConfig) -> None:
    """The files the dataset reads are there (unless dataset.download fetches them first)."""
    if d.name == "tokens" and d.text_file and not Path(d.text_file).expanduser().is_file():
        raise ConfigError(f"dataset.text_file={d.text_file} not found; give the path of a local text file")
    if d.name not in EXPECTED or d.download:
        return
    root = Path(d.root).expanduser().resolve()
    missing = [f for f in EXPECTED[d.name] if not (root / f).is_file()]
    if missing:
        raise ConfigError(
            f"dataset={d.name}: {root / missing[0]} not found; put the {d.name} files under "
            f"dataset.root={d.root} or run once with dataset.download=true"
        )


def _check_text(path: Path, seq_len: int, batch: int) -> None:
    from data import text_held_out

    size = path.stat().st_size
    # Training windows: what is left before the held-out tail (split_tail), targets shifted by one.
    train_tokens = size - (text_held_out(size, seq_len) * seq_len + 1)
    windows = max(0, (train_tokens - 1) // seq_len)
    if windows < batch:
        raise ConfigError(
            f"dataset.text_file={path} holds {size} bytes: {windows} training windows of dataset.seq_len="
            f"{seq_len} once its last tenth is held out, fewer than train.global_batch_size={batch}: use a "
            "longer file, or a smaller batch or seq_len"
        )


def _idx_count(path: Path, magic: int, dims: int) -> int:
    """Samples in an idx file, after checking that its header matches its size (a truncated or
    foreign file fails here, not in every rank)."""
    header = 4 * (2 + dims)
    with open(path, "rb") as f:
        raw = f.read(header)
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        raise ConfigError(
            f"{path} is not an MNIST idx file (wrong header); replace it or use dataset.download=true"
        )
    n, *shape = struct.unpack(f">{1 + dims}I", raw[4:])
    expected = header + n * (shape[0] * shape[1] if shape else 1)
    if path.stat().st_size != expected:
        raise ConfigError(
            f"{path} is {path.stat().st_size} bytes but its header promises {expected} (truncated or corrupt); "
            "replace it or use dataset.download=true"
        )
    return n


def _check_cifar_md5(root: Path) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    base = root / CIFAR10.base_folder
    files = [*CIFAR10.train_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    for name, md5 in files:
        path = base / name
        if path.is_file() and not check_integrity(str(path), md5):
            raise ConfigError(
                f"{path} fails its published MD5 (corrupt, or not CIFAR-10); delete it and use "
                "dataset.download=true, or see docs/security.md before setting dataset.verify_checksums=false"
            )


def fetch(cfg: DatasetConfig) -> None:
    """dataset.download=true: fetch the files once, here, before launch (torchvision skips files
    that are already there and intact)."""
    if not cfg.download or cfg.name not in REAL:
        return
    from torchvision import datasets

    cls = datasets.MNIST if cfg.name == "mnist" else datasets.CIFAR10
    root = str(Path(cfg.root).expanduser())
    try:
        cls(root, train=True, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError
        reason = str(getattr(e, "reason", None) or e).strip().splitlines()
        raise DataUnavailable(
            f"dataset={cfg.name}: download into {root} failed ({reason[0] if reason else type(e).__name__}); "
            f"no network here? put the files under dataset.root={cfg.root} and set dataset.download=false"
        ) from None
