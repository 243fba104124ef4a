"""The loop's own promises: one point per step, clipping that engages, the Meter's flags, the data position."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from data.sampler import ShardedBatchSampler
from experiments.report.parity import run_case
from experiments.train.meter import timing_check
from parallel.distenv import RankEnv
from tests.helpers import TINY


def test_log_steps_write_every_step_at_its_own_number(tmp_path):
    # 10 steps, logged every 4: the buffered steps are written when the interval closes, and the
    # last interval (9, 10) closes at the final step.
    job = tmp_path / "job"
    m = run_case(
        [*TINY, "strategy=ddp", "launcher.nproc_per_node=2", "train.steps=10", "train.log_every=4"], job
    )
    assert len(m["losses"]) == len(m["grad_norms"]) == 10
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for r in (0, 1):
        acc = EventAccumulator(str(job / "tb" / f"rank{r}"), size_guidance={"scalars": 0})
        acc.Reload()
        for tag, expected in (("loss/train", m["losses"]), ("grad_norm", m["grad_norms"])):
            events = acc.Scalars(tag)
            assert [e.step for e in events] == list(range(1, 11))
            assert [e.value for e in events] == pytest.approx(expected, rel=1e-6)
        # Throughput is a property of an interval: one point per log step with clean steps in it.
        assert [e.step for e in acc.Scalars("perf/step_time_s")] == [4, 8, 10]
        # The held-out metrics of the evaluation after the last step, on every rank.
        for tag, key in (("loss/val", "val_loss"), ("acc/val", "val_acc")):
            assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(10, pytest.approx(m[key], rel=1e-6))]


def test_grad_clip_engages_and_reports_the_norm_before_clipping(tmp_path):
    base = [*TINY, "strategy=single", "launcher=local", "train.steps=4"]
    free = run_case(base, tmp_path / "free")
    clipped = run_case([*base, "train.grad_clip=0.05"], tmp_path / "clipped")
    assert free["grad_norms"][0] > 0.05, "the bound must be below the norm for clipping to act"
    assert clipped["grad_norms"][0] == free["grad_norms"][0]  # same first step, norm before clipping
    assert clipped["losses"][0] == free["losses"][0]
    assert clipped["losses"][1] != free["losses"][1]


def test_timing_is_flagged_when_ranks_outnumber_cores():
    cores = len(os.sched_getaffinity(0))
    ok, note = timing_check(RankEnv(local_world_size=cores), torch.device("cpu"))
    assert ok and note == ""
    ok, note = timing_check(RankEnv(local_world_size=cores + 1), torch.device("cpu"))
    assert not ok and f"{cores + 1} ranks share {cores} cores" in note


@pytest.mark.parametrize("start", [0, 3, 8, 21])
def test_sampler_resumes_the_same_stream(start):
    # 40 samples, global micro-batch 8: 5 batches an epoch, reshuffled each epoch.
    for rank in (0, 1):
        whole = ShardedBatchSampler(40, 8, rank, 2, seed=7, shuffle=True)
        resumed = ShardedBatchSampler(40, 8, rank, 2, seed=7, shuffle=True, start=start)
        expected = list(itertools.islice(iter(whole), start, start + 12))
        assert list(itertools.islice(iter(resumed), 12)) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_between_log_steps_on_cuda(tmp_path):
    # torch.cuda.set_sync_debug_mode("error") over every clean step: a sync there raises.
    m = run_case(
        [*TINY, "strategy=single", "launcher=local", "train.device=cuda", "train.check_syncs=true"],
        tmp_path / "job",
    )
    assert len(m["losses"]) == 6


@pytest.mark.parametrize("world", [2, 3, 8])
def test_grad_norm_squares_each_replicated_gradient_once_across_the_ranks(world):
    """DDP's gradients are whole on every rank: dealt out, each is squared by exactly one rank.
    With more ranks than tensors (8 ranks, 4 tensors) some ranks square none, and still hand back
    a zero of their own: clipping all-reduces it in place."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from experiments.train.step import GradNorm

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(2**i))
    shares = []
    for rank in range(world):
        # A fake process group: the mesh's coordinates without processes.
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            norm = GradNorm(model, init_device_mesh("cpu", (1, world), mesh_dim_names=("pp", "dp")))
        finally:
            dist.destroy_process_group()
        assert len(norm.local_grads()) == 4  # clipping scales every gradient, not only the share
        first = norm.local_sq()
        shares.append(first.item())
        first.add_(1.0)
        assert norm.local_sq().item() == shares[-1]
    whole = sum(float(p.grad.square().sum()) for p in model.parameters())
    assert sum(shares) == pytest.approx(whole, rel=1e-6)  # a tensor missed or doubled moves it by >= 12
    assert shares.count(0.0) == max(0, world - 4)
