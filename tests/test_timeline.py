"""Where the time goes (train.profile): each rank's Chrome trace, the step split read from it, and
the split checked where the answer is known: by construction on a timeline drawn by hand, and on
real gloo runs whose difference is known (DDP's one bucket cannot overlap backward, many can)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.measure.timeline import _sweep, split
from experiments.report.parity import run_case
from tests.helpers import SharedJobs, compare

GPT = [
    "model=transformer",
    "dataset=tokens",
    "model.hidden=64",
    "model.heads=4",
    "model.layers=4",
    "dataset.seq_len=32",
    "dataset.vocab_size=64",
    "train.steps=6",
    "train.global_batch_size=8",
    "dataset.num_samples=64",
    "train.profile=true",
    "train.profile_from=4",
    "train.profile_steps=2",
    "train.eval_samples=0",
    "train.objective=train_loss",
    "launcher=torchrun",
]
# Parts of the split other than overlapped communication, which lies under compute.
TOLERANCE = 1e-9  # the split partitions the profiled window: only float sums differ


def parts(r: dict) -> float:
    return sum(
        v for k, v in r.items() if k.startswith("time/") and k not in ("time/step",) and "overlapped" not in k
    )


def test_the_split_of_a_known_timeline():
    """Compute 0-10 ms, a collective on dp 5-15 ms, nothing 15-20: 10 compute (5 overlapped), 5
    exposed, 5 other. Delaying the collective by 3 ms adds exactly 3 ms of exposed time."""
    ms = 1000.0  # trace times are microseconds
    base = _sweep((0, 20 * ms), 1, [(0, 10 * ms)], [(5 * ms, 15 * ms, "dp_shard")], None)
    assert base.compute_s == pytest.approx(0.010) and base.other_s == pytest.approx(0.005)
    assert base.exposed_s == pytest.approx({"dp_shard": 0.005})
    assert base.overlapped_s == pytest.approx({"dp_shard": 0.005})
    late = _sweep((0, 20 * ms), 1, [(0, 10 * ms)], [(5 * ms, 18 * ms, "dp_shard")], None)
    assert late.exposed_s["dp_shard"] - base.exposed_s["dp_shard"] == pytest.approx(0.003)
    # Two axes at once: the instant goes to the collective that started first, never twice.
    both = _sweep((0, 20 * ms), 1, [], [(0, 10 * ms, "tp"), (5 * ms, 20 * ms, "dp_shard")], None)
    assert both.exposed_s == pytest.approx({"tp": 0.010, "dp_shard": 0.010})
    # A pipeline rank's idle time is its bubble.
    pp = _sweep((0, 20 * ms), 1, [(0, 10 * ms)], [], "pp")
    assert pp.bubble_s == pytest.approx(0.010) and pp.other_s == 0


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    shared = SharedJobs(tmp_path_factory, "timeline")
    return lambda *overrides: shared.get([*GPT, *overrides], run_case)


def test_every_rank_writes_a_trace_and_the_split_is_the_step(jobs):
    m, job = jobs("strategy=ddp", "launcher.nproc_per_node=2", "strategy.bucket_cap_mb=0.01")
    for r in m["ranks"]:
        with gzip.open(job / "traces" / f"rank{r['rank']}.pt.trace.json.gz", "rt") as f:
            trace = json.load(f)
        marks = [
            e["name"] for e in trace["traceEvents"] if str(e.get("name", "")).startswith("ProfilerStep#")
        ]
        assert sorted(marks) == ["ProfilerStep#4", "ProfilerStep#5"], marks
        # Read again from the file, the split is the one the run logged.
        again = split(trace, [], None)
        assert again is not None and again.step_s == pytest.approx(r["time/step"])
        assert again.compute_s == pytest.approx(r["time/compute"])
        assert abs(parts(r) - r["time/step"]) <= TOLERANCE * r["time/step"], r
        assert r["time/compute"] > 0 and r["time/exposed_comm/world"] > 0


def _backward_under_comm(trace_file: Path) -> list[str]:
    """The backward ops of the step's thread that run while one of gloo's collectives does: aten
    ops inside an autograd node, less the launch itself (a bucket's all-reduce is issued from
    within the AccumulateGrad node that makes it ready)."""
    with gzip.open(trace_file, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    main = next(e["tid"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#"))

    def spans(prefix: str, tid_is_main: bool) -> list[tuple[float, float]]:
        return [
            (e["ts"], e["ts"] + e["dur"])
            for e in events
            if str(e.get("name", "")).startswith(prefix) and (e["tid"] == main) == tid_is_main
        ]

    comm, nodes = spans("gloo:", False), spans("autograd::engine::evaluate_function", True)
    launches = spans("c10d::", True)

    def inside(t: float, within: list[tuple[float, float]]) -> bool:
        return any(a <= t < b for a, b in within)

    return [
        e["name"]
        for e in events
        if e["tid"] == main
        and str(e["name"]).startswith("aten::")
        and inside(e["ts"], nodes)
        and not inside(e["ts"], launches)
        and any(a < e["ts"] + e["dur"] and e["ts"] < b for a, b in comm)
    ]


def test_many_ddp_buckets_overlap_backward_and_one_cannot(jobs, tmp_path):
    one, one_dir = jobs("strategy=ddp", "launcher.nproc_per_node=2", "strategy.bucket_cap_mb=100")
    many, many_dir = jobs("strategy=ddp", "launcher.nproc_per_node=2", "strategy.bucket_cap_mb=0.01")
    for a, b in zip(one["ranks"], many["ranks"], strict=True):
        # One bucket is all-reduced once backward is over: no backward op runs under it. (The
        # split may still count a little overlap: gloo's worker thread records a span's end after
        # it completes the result, late when the CPU is oversubscribed; docs/measurement.md.)
        trace = f"rank{a['rank']}.pt.trace.json.gz"
        assert _backward_under_comm(one_dir / "traces" / trace) == [], a
        assert _backward_under_comm(many_dir / "traces" / trace), b
        assert b["time/overlapped_comm/world"] > 0.0, b
    # The compare report draws the split, one stacked bar per job.
    root = tmp_path / "sweep"
    root.mkdir()
    for name, d in (("one", one_dir), ("many", many_dir)):
        shutil.copytree(d, root / name)
    proc = compare(root)
    assert proc.returncode == 0, proc.stderr
    assert "![time.png](time.png)" in (root / "report.md").read_text()
    assert (root / "time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.full
def test_tensor_parallel_collectives_sit_on_the_critical_path(jobs):
    """fsdp_tp at 4 ranks: TP's all-reduces and FSDP's gathers each show on their own axis."""
    m, _ = jobs("strategy=fsdp_tp", "launcher.nproc_per_node=4")
    for r in m["ranks"]:
        assert r["time/exposed_comm/tp"] > 0 and r["time/exposed_comm/dp_shard"] > 0, r
        assert abs(parts(r) - r["time/step"]) <= TOLERANCE * r["time/step"], r


@pytest.mark.full
def test_a_collective_entered_late_is_exposed_by_that_delay(tmp_path):
    """Rank 1 enters each step's DDP all-reduce 0.3 s late (a comm hook injected at interpreter
    start, tests/mutants/sitecustomize.py): rank 0's exposed communication rises by about that."""
    from tests.helpers import REPO, child_env
    from tests.mutants.sitecustomize import DELAY_S

    def rank0(name: str, inject: bool) -> dict:
        env = child_env()
        if inject:
            mutants = str(REPO / "tests" / "mutants")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (mutants, str(REPO), env.get("PYTHONPATH")) if p)
            env["PARALAB_MUTANT"] = "delay_rank1_allreduce"
        args = [*GPT, "strategy=ddp", "launcher.nproc_per_node=2", "strategy.bucket_cap_mb=100"]
        job = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "train.py", *args, f"hydra.run.dir={job}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads((job / "metrics.json").read_text())["ranks"][0]

    base, late = rank0("base", False), rank0("late", True)
    rise = late["time/exposed_comm/world"] - base["time/exposed_comm/world"]
    # The sleep is the delay's floor; the bound above leaves the machine's noise its room.
    assert 0.8 * DELAY_S <= rise <= 1.5 * DELAY_S, (rise, base, late)
    assert abs(parts(late) - late["time/step"]) <= TOLERANCE * late["time/step"]


@pytest.mark.full
def test_fsdp_resharding_after_forward_gathers_every_block_again(jobs):
    """ZeRO-3 (reshard_after_forward) gathers each block again for backward: its trace holds, per
    step, 2 × blocks + 1 all-gathers on the FSDP axis against blocks + 1 (the root's stays
    gathered); both sit in the split's communication of that axis. (Their exposed time rises by
    less than this machine's noise: docs/measurement.md.)"""
    blocks = 4
    for reshard, gathers in (("true", 2 * blocks + 1), ("false", blocks + 1)):
        m, job = jobs(
            "strategy=fsdp", "launcher.nproc_per_node=2", f"strategy.reshard_after_forward={reshard}"
        )
        for r in m["ranks"]:
            with gzip.open(job / "traces" / f"rank{r['rank']}.pt.trace.json.gz", "rt") as f:
                events = json.load(f)["traceEvents"]
            spans = [e for e in events if e.get("name") == "gloo:all_gather"]
            assert len(spans) == 2 * gathers, (reshard, len(spans))  # two profiled steps
            assert r["time/exposed_comm/world"] > 0
