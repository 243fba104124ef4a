"""torchvision datasets read from a local root (data.checks says before launch when files are missing)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.vision import VisionDataset

from experiments.config.schema import DatasetConfig

NORMALIZE = {"mnist": ((0.1307,), (0.3081,)), "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds: dicts, lists, bytes, strings and numbers (pickle's
    own) and numpy arrays. Any other global a crafted file names (os.system, say) is refused
    instead of called."""

    NUMPY = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.NUMPY:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR-10 batch holds")


def load_batch(path: str) -> dict:
    """One CIFAR-10 python batch, read by the restricted unpickler whatever the checksum setting."""
    with open(path, "rb") as f:
        try:
            return _BatchUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise pickle.UnpicklingError(f"{path} is not a CIFAR-10 batch: {e}") from None


class CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 (its files, layout, __getitem__), with every batch read by
    load_batch: torchvision's own loader unpickles them with the full pickle machinery, so a
    crafted file would run code in every rank. `verify`: check the published MD5s first."""

    def __init__(self, root: str, train: bool, transform: object, verify: bool) -> None:
        VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        if verify and not self._check_integrity():
            raise RuntimeError(
                f"CIFAR-10 under {root} is missing or corrupted: its files fail their published MD5s"
            )
        folder = os.path.join(self.root, self.base_folder)
        batches = [
            load_batch(os.path.join(folder, name))
            for name, _ in (self.train_list if train else self.test_list)
        ]
        self.data = np.vstack([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [label for b in batches for label in b["labels"]]
        self.classes = load_batch(os.path.join(folder, self.meta["filename"]))[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def vision_dataset(cfg: DatasetConfig, seed: int, val: bool = False) -> Dataset:
    """The training split, or with `val` the held-out one."""
    if cfg.name == "fake_images":
        # FakeData seeds image i with random_offset + i: the held-out images take the seeds after
        # the training ones.
        return datasets.FakeData(
            size=cfg.val_samples if val else cfg.num_samples,
            image_size=tuple(cfg.input_shape),
            num_classes=cfg.num_classes,
            transform=transforms.ToTensor(),
            random_offset=seed + cfg.num_samples if val else seed,
        )
    mean, std = NORMALIZE[cfg.name]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    root = str(Path(cfg.root).expanduser())
    # Never download here, in every rank at once: data.checks.fetch ran once before launch.
    if cfg.name == "mnist":
        return datasets.MNIST(root, train=not val, download=False, transform=tf)
    return CIFAR10(root, train=not val, transform=tf, verify=cfg.verify_checksums)
