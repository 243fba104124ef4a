"""torchvision datasets read from a local root (data.checks says before launch when files are missing)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from experiments.config.schema import DatasetConfig

NORMALIZE = {"mnist": ((0.1307,), (0.3081,)), "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


class _UncheckedCIFAR10(datasets.CIFAR10):
    # md5=None makes torchvision's check_integrity test existence only (for small test files).
    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


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
    cls = datasets.CIFAR10 if cfg.verify_checksums else _UncheckedCIFAR10
    return cls(root, train=not val, download=False, transform=tf)
