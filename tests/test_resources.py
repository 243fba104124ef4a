"""The pre-launch memory check counts what the run's theory predicts: one formula for both.

No process starts here: the theory's side is built as experiments/train/setup.py builds it on a rank,
from a real (unsharded) model, which holds the same shapes where tp = pp = 1; under TP and PP the
check is the advisor's count of the job (checked against the ranks in test_measure).
"""

from __future__ import annotations

import pytest
import torch

from experiments.config.schema import Config, typed_config
from experiments.measure.predict import predict
from experiments.measure.record import Tag
from experiments.measure.theory import Precision, zero_model_state_bytes
from experiments.plan.sizes import zero1_largest_share
from experiments.report.parity import compose_config
from experiments.run.resources import (
    check_resources,
    checkpoints_on_disk,
    model_state_bytes_per_rank,
    parameter_count,
)
from parallel.costs import ModelSizes, Setting, optimizer_state_bytes_per_param
from parallel.mesh import Degrees
from parallel.registry import get_spec, resolve_degrees
from tests.test_parity import GPT

SMALL = ("model.hidden=32", "model.layers=2", "dataset.input_shape=[8]", "train.global_batch_size=16")
MOMENTUM = ("train.optimizer=sgd", "train.momentum=0.9")
ADAMW = ("train.optimizer=adamw",)


def _config(*overrides: str, world: int) -> tuple[Config, Degrees]:
    cfg: Config = typed_config(  # type: ignore[assignment]
        compose_config([*SMALL, *overrides, f"launcher.nproc_per_node={world}"])
    )
    return cfg, resolve_degrees(cfg.strategy, world)


def _run_time_theory(cfg: Config, degrees: Degrees) -> float:
    """theory/mem/model_state_bytes as a rank logs it (experiments/train/setup.py), for tp = pp = 1."""
    from data import dataset_spec
    from models import build_model
    from parallel.layout import tp_local_shapes

    data = dataset_spec(cfg.dataset)
    model = build_model(cfg.model, data)
    params = list(model.parameters())
    in_blocks = {id(p) for p in model.blocks.parameters()}
    sizes = ModelSizes(
        sum(p.numel() for p in params),
        params[0].element_size(),
        local_shapes=tp_local_shapes(params),
        blocks_here=len(model.blocks),
        root_shapes=tp_local_shapes(p for p in params if id(p) not in in_blocks),
    )
    spec = get_spec(cfg.strategy.name)
    local_batch = cfg.train.global_batch_size // degrees.dp
    return predict(spec, Setting(cfg, degrees, sizes, local_batch, data.seq_len))[Tag.THEORY_MODEL_STATE]


CASES = [
    *((("strategy=deepspeed", f"strategy.zero_stage={z}"), f"deepspeed_zero{z}") for z in (1, 2, 3)),
    (("strategy=zero3",), "zero3"),
    (("strategy=zero3", *GPT), "zero3-transformer"),  # a root (embedding, head) kept gathered
    (("strategy=zero2",), "zero2"),
    (("strategy=ddp",), "ddp"),
]


@pytest.mark.parametrize("optimizer", [MOMENTUM, ADAMW], ids=["sgd-momentum", "adamw"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("overrides", [c for c, _ in CASES], ids=[i for _, i in CASES])
def test_the_check_counts_the_run_time_theory(overrides, world, optimizer):
    cfg, d = _config(*overrides, *optimizer, world=world)
    assert model_state_bytes_per_rank(cfg, d) == _run_time_theory(cfg, d)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_is_counted_with_its_fp32_master_partition(stage):
    # What the paper's fp32 formula (the check's old count) leaves out: b·Ψ/N of optimizer state
    # at every stage, and from stage 3 one gathered copy of the parameters.
    cfg, d = _config("strategy=deepspeed", f"strategy.zero_stage={stage}", *ADAMW, world=4)
    psi, n, k = parameter_count(cfg), d.dp, optimizer_state_bytes_per_param(cfg)
    paper = zero_model_state_bytes({1: "os", 2: "os+g", 3: "os+g+p"}[stage], psi, n, Precision(4, 4, k))
    gathered = 4 * psi if stage == 3 else 0
    assert model_state_bytes_per_rank(cfg, d) == pytest.approx(paper + 4 * psi / n + gathered)


@pytest.mark.parametrize(
    ("overrides", "even_is_over"),
    [
        (("strategy=fsdp_tp", "strategy.tp=2"), True),
        (("strategy=tp",), False),
        (("strategy=pp", "strategy.schedule=1f1b"), False),
        (("strategy=pp", "strategy.schedule=gpipe"), False),
        (("strategy=ddp_pp",), False),
    ],
    ids=["fsdp_tp", "tp", "pp-1f1b", "pp-gpipe", "ddp_pp"],
)
def test_tensor_and_pipeline_ranks_are_counted_as_the_advisor_counts_each_ranks_own_share(
    overrides, even_is_over
):
    """Under TP and PP a rank's share depends on the plan and the stage split: the check counts
    the fullest rank as the advisor does for the job (metrics.json's `plan`, which test_measure
    checks against what the ranks hold), not the paper's formula on an even 1/(tp·pp)."""
    from data import dataset_spec
    from experiments.plan import predict_job
    from experiments.run.resources import rank_bytes

    cfg, d = _config(*overrides, *GPT, *ADAMW, world=4)
    plan = predict_job(cfg, d, dataset_spec(cfg.dataset))
    assert model_state_bytes_per_rank(cfg, d) == pytest.approx(plan["model_state_bytes"], rel=1e-12)
    assert sum(rank_bytes(cfg, d).values()) == pytest.approx(plan["memory_bytes"], rel=1e-12)
    # The check's old count, DP's formula on an even 1/(tp·pp) of the parameters, was wrong both
    # ways: over where FSDP shards the TP shards again, under where a rank holds the embedding or
    # the head whole (TP leaves them replicated; a pipeline's first and last stages hold them).
    even = zero_model_state_bytes("dp", parameter_count(cfg) / (d.tp * d.pp), d.dp, Precision(4, 4, 8))
    assert (model_state_bytes_per_rank(cfg, d) < even) == even_is_over


def test_zero1_counts_the_fullest_ranks_share_as_zero_redundancy_optimizer_assigns_it():
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from data import dataset_spec
    from models import build_model

    cfg, d = _config("strategy=zero1", *ADAMW, world=3)
    model = build_model(cfg.model, dataset_spec(cfg.dataset))
    # A fake process group: ZeroRedundancyOptimizer partitions by world size, no process needed.
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=3)
    try:
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.1)
        owned = [sum(p.numel() for g in rank for p in g["params"]) for rank in opt._partition_parameters()]
    finally:
        dist.destroy_process_group()
    assert zero1_largest_share([p.numel() for p in model.parameters()], 3) == max(owned)
    psi = sum(p.numel() for p in model.parameters())
    assert model_state_bytes_per_rank(cfg, d) == 4 * psi + 4 * psi + 8 * max(owned)


@pytest.mark.parametrize(
    ("steps", "every", "keep", "on_disk"),
    [
        (200, 0, 2, 1),  # only the final checkpoint is ever written
        (6, 1, 10**12, 6),  # keep more than the run writes: all of them, no more
        (6, 1, 2, 3),  # the newest two, and the third while it is written
        (7, 2, 0, 4),  # steps 2, 4, 6 and the final 7, all kept
        (6, 2, 1, 2),
    ],
)
def test_the_disk_check_counts_the_checkpoints_a_run_can_hold(steps, every, keep, on_disk, tmp_path):
    assert checkpoints_on_disk(steps, every, keep) == on_disk
    cfg, degrees = _config(
        f"train.steps={steps}", f"train.checkpoint_every={every}", f"train.keep_checkpoints={keep}", world=1
    )
    check_resources(cfg, degrees, tmp_path / "job")  # a tiny model's checkpoints fit any disk
