"""Every strategy trains what one process trains: same seed, same global batch, same losses and
final parameters. The matrix is data; each case runs through the real launcher (forkserver ranks,
gloo), and its checkpoint is loaded back unsharded through torch.distributed.checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from data import dataset_spec
from experiments.checkpoint import load_full_model_state
from experiments.config import Config
from experiments.parity import compose_config, deviations, reference_overrides, run_case, tolerance
from models import build_model

MLP = ["model=mlp", "model.hidden=16", "model.layers=4", "dataset.input_shape=[8]"]
GPT = [
    "model=transformer",
    "dataset=tokens",
    "model.hidden=32",
    "model.heads=4",
    "model.layers=4",
    "dataset.seq_len=16",
    "dataset.vocab_size=32",
]
CNN = (
    "model=cnn",
    "dataset=fake_images",
    "model.channels=4",
    "model.layers=2",
    "dataset.input_shape=[3,16,16]",
)
COMMON = [
    "train.steps=5",
    "train.global_batch_size=16",
    "dataset.num_samples=256",
    "train.save_checkpoint=true",
    "launcher=torchrun",
]


@dataclass(frozen=True)
class Case:
    strategy: str
    world: int
    model: tuple[str, ...] = tuple(MLP)
    extra: tuple[str, ...] = ()

    @property
    def overrides(self) -> list[str]:
        return [
            *COMMON,
            *self.model,
            f"strategy={self.strategy}",
            f"launcher.nproc_per_node={self.world}",
            *self.extra,
        ]

    def __str__(self) -> str:
        model = {tuple(GPT): "gpt", CNN: "cnn"}.get(self.model, "mlp")
        extra = (f"{k.split('.')[-1]}={v}" for k, v in (e.split("=", 1) for e in self.extra))
        return "-".join([self.strategy, f"ws{self.world}", model, *extra])


G = tuple(GPT)
MATRIX = [
    *(Case(s, w) for s in ("ddp", "zero1", "zero2", "zero3", "tp", "pp", "mp") for w in (2, 4)),
    *(Case(s, 1) for s in ("ddp", "zero1", "fsdp", "tp")),
    Case("dp", 1),
    Case("tp", 2, G),
    Case("tp", 4, G, ("strategy.sequence_parallel=true",)),
    *(
        Case("pp", 2, G, (f"strategy.schedule={s}",))
        for s in ("gpipe", "interleaved1f1b", "looped_bfs", "interleaved_zb", "zbv")
    ),
    Case("fsdp_tp", 4, G),
    Case("ddp_pp", 4, G),
    # Gradient accumulation (no sync on inner micro-steps) and bf16 autocast.
    Case("ddp", 2, extra=("train.grad_accum_steps=2",)),
    Case("fsdp", 4, extra=("train.grad_accum_steps=2",)),
    Case("pp", 2, G, ("train.grad_accum_steps=2",)),
    Case("ddp_pp", 4, G, ("train.grad_accum_steps=2",)),
    Case("zero3", 2, G, ("train.precision=bf16",)),
    Case("tp", 2, G, ("train.precision=bf16",)),
    Case("zero1", 2, extra=("train.optimizer=adamw", "train.lr=0.01")),
    Case("ddp", 2, extra=("strategy.gradient_as_bucket_view=true", "strategy.bucket_cap_mb=0.01")),
    Case("ddp", 4, CNN),
    Case("fsdp", 2, extra=("train.optimizer=adamw", "train.lr=0.01")),
    # Clipping reduces the norm's shares once per step, whatever the sharding.
    Case("fsdp", 2, extra=("train.grad_clip=0.3",)),
    Case("tp", 2, G, ("train.grad_clip=0.3",)),
    Case("pp", 2, G, ("train.grad_clip=0.3",)),
]
FULL = [Case("fsdp_tp_pp", 8, G)]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache: dict[tuple[str, ...], dict] = {}

    def get(case: Case) -> tuple[dict, Path]:
        key = tuple(reference_overrides(case.overrides))
        if key not in cache:
            job = tmp_path_factory.mktemp("single") / "job"
            cache[key] = (run_case(list(key), job), job)
        return cache[key]

    return get


def full_params(job: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    cfg: Config = compose_config(overrides)  # type: ignore[assignment]
    model = build_model(cfg.model, dataset_spec(cfg.dataset))
    return load_full_model_state(job, model)


def check(case: Case, tmp_path: Path, references) -> None:
    ref, ref_job = references(case)
    got = run_case(case.overrides, tmp_path / "job")
    assert got["world_size"] == case.world
    tol = tolerance(got["precision"])
    worst = max(deviations(got["losses"], ref["losses"]))
    assert worst <= tol, f"{case}: loss deviates {worst:.2e} > {tol:.0e}\n{got['losses']}\n{ref['losses']}"
    # The norm is reduced once per log step from each rank's share: it must be the whole gradient's.
    worst = max(deviations(got["grad_norms"], ref["grad_norms"]))
    assert worst <= 10 * tol, (
        f"{case}: grad norm deviates {worst:.2e}\n{got['grad_norms']}\n{ref['grad_norms']}"
    )
    mine, theirs = full_params(tmp_path / "job", case.overrides), full_params(ref_job, case.overrides)
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        scale = theirs[name].abs().max().clamp_min(1e-3)
        dev = ((value - theirs[name]).abs().max() / scale).item()
        assert dev <= 10 * tol, f"{case}: parameter {name} deviates {dev:.2e}"


@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_matches_single_process(case, tmp_path, references):
    check(case, tmp_path, references)


@pytest.mark.full
@pytest.mark.parametrize("case", FULL, ids=str)
def test_matches_single_process_full(case, tmp_path, references):
    check(case, tmp_path, references)
