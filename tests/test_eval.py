"""Held-out evaluation: splits no training batch touches, shards that count each sample once, a
model that learns above chance, and the objective a sweeper (Optuna) optimises."""

from __future__ import annotations

import importlib.util
import json
import pickle
import struct

import numpy as np
import pytest
import torch

from data import build_dataset, take
from data.sampler import eval_index_batches
from data.tokens import TokenWindows, markov_stream
from experiments.config.schema import DatasetConfig, typed_config
from experiments.report.parity import compose_config, run_case
from tests.helpers import TINY, run


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def _all(ds) -> tuple[torch.Tensor, torch.Tensor]:
    return take(ds, torch.arange(len(ds)))


@pytest.mark.parametrize("name", ["synthetic", "fake_images"])
def test_generated_held_out_samples_are_never_training_samples(name):
    shape = [8] if name == "synthetic" else [3, 8, 8]
    cfg = DatasetConfig(name=name, num_samples=64, val_samples=40, input_shape=shape, num_classes=4)
    train, val = build_dataset(cfg, seed=3), build_dataset(cfg, seed=3, split="val")
    (xt, yt), (xv, yv) = _all(train), _all(val)
    assert len(val) == 40 and len(train) == 64
    assert not _rows(xt) & _rows(xv), "a held-out input is also a training input"
    assert len(torch.unique(yv)) > 1
    if name == "synthetic":
        # Drawing the held-out split leaves the training set as it was.
        alone = build_dataset(
            DatasetConfig(name=name, num_samples=64, input_shape=shape, num_classes=4), seed=3
        )
        assert torch.equal(alone.tensors[0], xt) and torch.equal(alone.tensors[1], yt)


def _read_positions(ds: TokenWindows) -> int:
    """How many leading tokens of its stream the windows read, inputs and targets together."""
    return len(ds) * ds.seq_len + 1


def test_token_held_out_tail_follows_every_token_training_reads(tmp_path):
    cfg = DatasetConfig(name="tokens", num_samples=50, val_samples=7, seq_len=8, vocab_size=16)
    train, val = build_dataset(cfg, seed=0), build_dataset(cfg, seed=0, split="val")
    assert len(train) == 50 and len(val) == 7
    # The two are disjoint pieces of one stream, and training reads only its own piece.
    assert _read_positions(train) <= len(train.stream) and _read_positions(val) <= len(val.stream)
    whole = markov_stream((50 + 7) * 8 + 2, 16, seed=0)
    assert torch.equal(torch.cat([train.stream, val.stream]), whole)
    text = tmp_path / "corpus.txt"
    text.write_bytes(bytes(range(256)) * 2)
    cfg = DatasetConfig(name="tokens", text_file=str(text), seq_len=8)
    train, val = build_dataset(cfg, seed=0), build_dataset(cfg, seed=0, split="val")
    n = (512 - 1) // 8
    assert len(val) == n // 10 and len(train) + len(val) <= n
    assert bytes(train.stream.tolist()) + bytes(val.stream.tolist()) == text.read_bytes()
    # The last training target precedes the first held-out input in the file.
    assert _read_positions(train) <= len(train.stream)


def _write_idx(path, magic, dims, data: bytes):
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + data)


def test_mnist_and_cifar10_hold_out_their_test_split(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, fill in (("train", 6, 0), ("t10k", 4, 200)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, (n, 28, 28), bytes([fill]) * n * 784)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, (n,), bytes(range(n)))
    cfg = DatasetConfig(name="mnist", root=str(tmp_path), input_shape=[1, 28, 28])
    train, val = build_dataset(cfg, seed=0), build_dataset(cfg, seed=0, split="val")
    assert (len(train), len(val)) == (6, 4)
    assert not _rows(_all(train)[0]) & _rows(_all(val)[0])
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {"data": np.full((2, 3072), 10 * i, dtype=np.uint8), "labels": [0, 1]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    cfg = DatasetConfig(name="cifar10", root=str(tmp_path), input_shape=[3, 32, 32], verify_checksums=False)
    train, val = build_dataset(cfg, seed=0), build_dataset(cfg, seed=0, split="val")
    assert (len(train), len(val)) == (10, 2)
    assert not _rows(_all(train)[0]) & _rows(_all(val)[0])


@pytest.mark.parametrize("n", [37, 32, 5])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_eval_shards_count_every_sample_exactly_once(n, dp):
    counted: list[int] = []
    shapes = set()
    for rank in range(dp):
        for idx, real in eval_index_batches(n, 16, rank, dp):
            shapes.add(idx.shape)
            counted += idx[real].tolist()
    assert sorted(counted) == list(range(n)) and shapes == {torch.Size([16 // dp])}


def test_short_run_beats_chance_and_returns_the_objective(tmp_path):

    from experiments.run.job import execute

    overrides = [*TINY, "strategy=single", "launcher=local", "train.steps=40", "train.eval_every=20"]
    overrides += ["dataset.val_samples=200", "model.hidden=32"]
    cfg = compose_config(overrides)
    (tmp_path / "job").mkdir()
    objective = execute(cfg, typed_config(cfg), tmp_path / "job")
    m = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert objective == m["val_loss"] == m["evals"][-1]["val_loss"]
    assert [e["step"] for e in m["evals"]] == [20, 40] and m["val_ppl"] is None
    # Chance, from the held-out labels themselves: always answering the commonest class.
    typed = typed_config(cfg)
    labels = build_dataset(typed.dataset, typed.seed, "val").tensors[1]
    chance = labels.bincount().max().item() / len(labels)
    assert m["val_acc"] > chance + 0.1, (m["val_acc"], chance)
    assert m["evals"][0]["wall_s"] < m["evals"][1]["wall_s"]


def test_objective_can_be_the_training_loss_or_throughput(tmp_path):
    from experiments.measure.record import RunRecord

    m = run_case(
        [*TINY, "strategy=single", "launcher=local", "train.eval_samples=0", "train.objective=train_loss"],
        tmp_path / "j",
    )
    r = RunRecord.read(tmp_path / "j")
    assert m["val_loss"] is None and m["evals"] == []
    assert r.objective("train_loss") == m["final_loss"] and r.objective("samples_per_s") == m["samples_per_s"]


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="the optuna extra is not installed (pip install -e '.[optuna]')",
)
def test_optuna_searches_the_learning_rate_on_the_held_out_loss(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(
        [
            "-m",
            "experiment=lr_search",
            "hydra.sweeper.n_trials=3",
            *TINY,
            "strategy=single",
            "launcher=local",
            "launcher.nproc_per_node=1",
            "dataset.val_samples=64",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(jobs) == 3 and all(p.name.startswith("train.lr=") for p in jobs)
    losses = {
        float(p.name.removeprefix("train.lr=")): json.loads((p / "metrics.json").read_text())["val_loss"]
        for p in jobs
    }
    assert len(set(losses)) == 3
    from omegaconf import OmegaConf

    best = OmegaConf.load(sweep / "optimization_results.yaml")
    # The sweeper saw each job's objective (its held-out loss) and kept the lowest.
    assert best.best_value == min(losses.values())
    assert losses[best.best_params["train.lr"]] == best.best_value
