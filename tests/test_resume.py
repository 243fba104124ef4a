"""A resumed run is the same run: interrupted at step k and resumed, every strategy matches its
uninterrupted run exactly (fp32, same world size); resumed at another strategy or world size, it
matches within float tolerance. The matrix is data, like the parity matrix."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from experiments.config.schema import typed_config
from experiments.report.parity import deviations, run_case
from experiments.run.launch import JobFailed
from experiments.train.checkpoint import COMPLETE, complete_checkpoints, resolve
from tests import test_parity as parity
from tests.test_parity import GPT, NEEDS_DEEPSPEED, full_params

STEPS, CUT = 6, 3
# AdamW carries optimizer state and its step count; a warmup that spans the cut needs the
# scheduler's state. (Ending the first run early by lowering train.steps is an interruption only
# for schedules that do not depend on train.steps: cosine is covered by the SIGTERM test.)
COMMON = [
    f"train.steps={STEPS}",
    "train.global_batch_size=16",
    "dataset.num_samples=64",  # 4 batches an epoch: the resumed data stream crosses an epoch
    "train.optimizer=adamw",
    "train.lr=0.01",
    "train.warmup_steps=5",
    "train.log_every=2",
    "launcher=torchrun",
    "train.predict=false",  # the advisor's prediction is checked in test_measure and test_compare
]


@dataclass(frozen=True)
class Case(parity.Case):
    common: ClassVar[tuple[str, ...]] = tuple(COMMON)

    def launcher(self) -> list[str]:
        return ["launcher=local"] if self.world == 1 else super().launcher()


G = tuple(GPT)
MATRIX = [
    Case("single", 1),
    # DDP at 4 ranks: at 2, a changed bucket layout cannot change a sum of two (see replay_on_resume).
    *(Case(s, 4) for s in ("ddp", "zero1")),
    *(Case(s, 2) for s in ("zero3", "tp")),
    # The same machinery as zero3 (FSDP2) and pp (pipelining), for make test-full's budget.
    *(pytest.param(Case(s, 2), marks=pytest.mark.full) for s in ("zero2", "mp")),
    pytest.param(Case("hsdp", 4), marks=pytest.mark.full),  # 2 replica groups × 2 shards
    # The ring's ranks, and experts saved and loaded as DTensors split over ep.
    pytest.param(Case("fsdp", 4, G, ("strategy.cp=2",)), marks=pytest.mark.full),
    pytest.param(Case("fsdp", 4, parity.MOE, ("strategy.ep=2",)), marks=pytest.mark.full),
    Case("pp", 2, G),
    # 2D hybrids (their parts resume in make test above): make test-full's budget.
    pytest.param(Case("fsdp_tp", 4, G), marks=pytest.mark.full),
    pytest.param(Case("ddp_pp", 4, G), marks=pytest.mark.full),
    Case("ps", 2),
    pytest.param(Case("fsdp_tp_pp", 8, G), marks=pytest.mark.full),  # 8 processes: make test-full
]


def interrupted_then_resumed(overrides: list[str], job: Path) -> dict:
    """The same job dir twice: a run that ends at CUT (its final checkpoint), then the full run."""
    first = run_case([*overrides, f"train.steps={CUT}"], job)
    assert len(first["losses"]) == CUT
    return run_case(overrides, job)


@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_resumed_run_is_the_same_run(case, tmp_path):
    whole = run_case(case.overrides, tmp_path / "whole")
    resumed = interrupted_then_resumed(case.overrides, tmp_path / "resumed")
    assert resumed["losses"] == whole["losses"], f"{case}\n{resumed['losses']}\n{whole['losses']}"
    assert resumed["grad_norms"] == whole["grad_norms"], case
    assert resumed["resumes"] == [{"from_step": CUT, "restart": 0}]
    mine, theirs = (
        full_params(tmp_path / "resumed", case.overrides),
        full_params(tmp_path / "whole", case.overrides),
    )
    for name, value in mine.items():
        assert torch.equal(value, theirs[name]), f"{case}: parameter {name} differs after resume"
    # TensorBoard: one point per step, none twice, none missing, across the two processes' files.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "resumed" / "tb" / "rank0"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("loss/train")
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    assert [e.value for e in events] == pytest.approx(whole["losses"], rel=1e-6)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (Case("fsdp", 4), Case("ddp", 2)),
        (Case("tp", 2, G), Case("single", 1, G)),
        (Case("ddp", 2), Case("zero1", 4)),
    ],
    ids=["fsdp4-to-ddp2", "tp2-to-single", "ddp2-to-zero1-4"],
)
def test_resharded_resume_continues_the_run(source, target, tmp_path):
    check_resharded_resume(source, target, tmp_path)


@pytest.mark.full
@NEEDS_DEEPSPEED
@pytest.mark.parametrize(
    ("source", "target"),
    [
        (Case("deepspeed", 2, extra=(f"strategy.zero_stage={z}",)), Case(target, 2))
        for z, target in ((3, "ddp"), (1, "zero1"))
    ],
    ids=["deepspeed_zero3-to-ddp2", "deepspeed_zero1-to-zero1"],
)
def test_deepspeed_checkpoint_resumes_in_torch(source, target, tmp_path):
    """DeepSpeed's partitions are saved whole, by parameter name: any strategy continues the run."""
    check_resharded_resume(source, target, tmp_path)


@NEEDS_DEEPSPEED
def test_resuming_into_deepspeed_is_one_clear_error(tmp_path):

    from experiments.config.schema import ConfigError
    from experiments.report.parity import compose_config
    from experiments.run.job import execute

    ds = Case("deepspeed", 2, extra=("strategy.zero_stage=1",))
    run_case([*Case("ddp", 2).overrides, f"train.steps={CUT}"], tmp_path / "source")
    overrides = [*ds.overrides, f"train.resume={tmp_path / 'source'}"]
    with pytest.raises(ConfigError, match="strategy=deepspeed cannot resume from a checkpoint yet"):
        run_case(overrides, tmp_path / "target")  # refused before launch
    assert not (tmp_path / "target").exists()
    # Past validation (a job started some other way), the engine refuses the load itself.
    cfg = compose_config(overrides)
    (tmp_path / "target").mkdir()
    with pytest.raises(JobFailed) as failed:
        execute(cfg, typed_config(cfg), tmp_path / "target")  # type: ignore[arg-type]
    assert "cannot resume from a checkpoint yet" in failed.value.message, failed.value.message


def check_resharded_resume(source: Case, target: Case, tmp_path: Path) -> None:
    # SGD with momentum: a momentum buffer per parameter to reshard. (AdamW divides by sqrt(v),
    # which turns reduction-order noise in near-zero gradients into 1e-3 parameter differences.)
    sgd = ["train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.05"]
    whole = run_case([*target.overrides, *sgd], tmp_path / "whole")
    run_case([*source.overrides, *sgd, f"train.steps={CUT}"], tmp_path / "source")
    resumed = run_case([*target.overrides, *sgd, f"train.resume={tmp_path / 'source'}"], tmp_path / "target")
    assert len(resumed["losses"]) == STEPS
    worst = max(deviations(resumed["losses"], whole["losses"]))
    assert worst <= 1e-5, f"{source} -> {target}: {worst:.1e}\n{resumed['losses']}\n{whole['losses']}"
    mine, theirs = (
        full_params(tmp_path / "target", target.overrides),
        full_params(tmp_path / "whole", target.overrides),
    )
    for name, value in mine.items():
        scale = theirs[name].abs().max().clamp_min(1e-3)
        assert ((value - theirs[name]).abs().max() / scale).item() <= 1e-4, name


def test_a_resumed_run_makes_up_the_evaluation_due_at_its_first_step(tmp_path):
    """The history a run resumes lacks the evaluation due at its step (a stop there skips it; here,
    a source run that evaluated nothing): it runs first, in a fresh process, before any training
    step. A pipeline, whose stages then switch from forward-only to training."""
    case = [
        *Case("pp", 2, G).overrides,
        f"train.steps={STEPS}",
        "train.eval_every=3",
        "train.eval_samples=32",
    ]
    whole = run_case(case, tmp_path / "whole")
    run_case(
        [*case, f"train.steps={CUT}", "train.eval_samples=0", "train.objective=train_loss"],
        tmp_path / "source",
    )
    resumed = run_case([*case, f"train.resume={tmp_path / 'source'}"], tmp_path / "target")
    assert [e["step"] for e in whole["evals"]] == [CUT, STEPS]
    for key in ("step", "val_loss", "val_ppl"):
        assert [e[key] for e in resumed["evals"]] == [e[key] for e in whole["evals"]], key
    assert resumed["losses"] == whole["losses"]


def test_a_finished_job_dir_says_so_and_refuses_another_config(tmp_path):
    """One finished job dir, run twice more: the same command says it is finished and changes
    nothing; another config is refused (exit 2) and loses nothing."""
    from tests.helpers import TINY, run

    job = tmp_path / "job"
    args = [*TINY, "strategy=single", "launcher=local", f"hydra.run.dir={job}"]
    assert run(args).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in job.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    again = run(args)
    assert again.returncode == 0 and "is finished" in again.stdout, again.stdout + again.stderr
    after = {p: p.stat().st_mtime_ns for p in job.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert after == before
    other = run([*args, "train.lr=0.05"])
    assert other.returncode == 2
    assert "holds a run with another train.lr" in other.stderr
    assert json.loads((job / "metrics.json").read_text())["steps"] == 6


def test_a_save_without_its_marker_is_never_resumed_from(tmp_path):
    # What a save killed half-way leaves: a step dir with some of the files and no marker.
    job = tmp_path / "job"
    m = run_case(Case("ddp", 2).overrides + ["train.checkpoint_every=2"], job)
    assert [s for s, _ in complete_checkpoints(job)] == [4, 6]  # keep_checkpoints=2
    torn = job / "checkpoints" / "step_8"
    (torn).mkdir()
    for f in (job / "checkpoints" / "step_6").iterdir():
        if f.name != COMPLETE:
            (torn / f.name).write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    assert resolve("auto", job) == job / "checkpoints" / "step_6"
    assert len(m["losses"]) == STEPS


# ---- real signals from outside, on a real torchrun job ----

LONG = [
    "strategy=ddp",
    "launcher=torchrun",
    "launcher.nproc_per_node=2",
    "model.hidden=16",
    "model.layers=2",
    "dataset.input_shape=[8]",
    "dataset.num_samples=256",
    "train.global_batch_size=16",
    "train.steps=300",
    "train.log_every=10",
    "train.lr_schedule=cosine",
    "train.warmup_steps=20",
    "train.momentum=0.9",
]


# Every log step checkpoints and evaluates: each reads its reduction at once, so a stop lands on
# one, and skips the evaluation due there.
EVALUATED = [*LONG, "train.checkpoint_every=10", "train.eval_every=10", "train.eval_samples=32"]


@pytest.mark.parametrize(
    "to, start",
    [
        # SLURM, Kubernetes, systemd and job control signal the whole process group: the fork
        # server (the default start method) is in it. The launcher's forwarding of a SIGTERM it
        # alone received is also checked in make test, by test_faults (a checkpoint at the stop).
        ("group", "forkserver"),
        pytest.param("launcher", "forkserver", marks=pytest.mark.full),
        pytest.param("group", "spawn", marks=pytest.mark.full),
    ],
    ids=["group", "launcher", "group-spawn"],
)
def test_sigterm_stops_with_a_checkpoint_and_the_rerun_resumes_it(tmp_path, tmp_path_factory, to, start):
    from tests.helpers import SharedJobs, run
    from tests.procs import running

    whole, _ = SharedJobs(tmp_path_factory, "resume").get(EVALUATED, run_case)
    job = tmp_path / "job"
    with running(job, [*EVALUATED, f"launcher.start_method={start}"]) as j:
        j.ranks()
        if to == "launcher":
            j.proc.send_signal(signal.SIGTERM)  # what scancel / preemption sends
        else:
            os.killpg(j.proc.pid, signal.SIGTERM)  # the job runs in a session of its own
        j.finish(timeout=120)
    info = json.loads((job / "interrupted.json").read_text())
    assert info["signal"] == "SIGTERM" and 0 < info["step"] < 300 and info["step"] % 10 == 0, info
    assert (job / "checkpoints" / f"step_{info['step']}" / COMPLETE).is_file()
    assert not (job / "metrics.json").exists(), "an interrupted run must not look finished"
    again = run([*EVALUATED, f"launcher.start_method={start}", f"hydra.run.dir={job}"])  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((job / "metrics.json").read_text())
    assert resumed["losses"] == whole["losses"]
    # The evaluation the stop skipped is made up: the history has every one, with the same values.
    assert [(e["step"], e["val_loss"]) for e in resumed["evals"]] == [
        (e["step"], e["val_loss"]) for e in whole["evals"]
    ]
    assert resumed["resumes"] == [{"from_step": info["step"], "restart": 0}]
    assert not (job / "interrupted.json").exists()


def test_a_killed_rank_restarts_from_the_checkpoint_and_loses_no_step(tmp_path):
    from tests.procs import running, wait_for

    whole = run_case(LONG, tmp_path / "whole")
    job = tmp_path / "job"
    with running(job, [*LONG, "launcher.max_restarts=1", "train.checkpoint_every=50"]) as j:
        wait_for(
            lambda: (job / "checkpoints" / "step_50" / COMPLETE).is_file(),
            120,
            "the first checkpoint",
            j.proc,
        )
        victim = j.ranks()[1]
        os.kill(victim, signal.SIGKILL)  # a real kill, from outside
        code, err, _ = j.finish(timeout=180)
    assert code == 0, err[-3000:]
    m = json.loads((job / "metrics.json").read_text())
    assert len(m["losses"]) == 300
    assert m["losses"] == whole["losses"]
    assert [r["restart"] for r in m["resumes"]] == [1] and m["resumes"][0]["from_step"] >= 50
    mine, theirs = full_params(job, LONG), full_params(tmp_path / "whole", LONG)
    for name, value in mine.items():
        assert torch.equal(value, theirs[name]), name


@pytest.mark.parametrize(
    "every, kept",
    [
        # Each step checkpoints, so each step's values are read at once: step 1's checkpoint stays.
        (("train.checkpoint_every=1",), [1]),
        # Step 2 is a log step that does not checkpoint: its values would be read at step 3's end,
        # but the evaluation due at step 2 reads them first, and so never runs on broken weights.
        (("train.log_every=2", "train.checkpoint_every=0", "train.eval_every=2"), []),
    ],
    ids=["read-at-its-step", "read-a-step-later"],
)
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, every, kept):
    from tests.helpers import TINY, run

    job = tmp_path / "job"
    # lr 1e30: the first update overflows every later forward pass to inf, on any CPU.
    proc = run([*TINY, "strategy=ddp", "train.lr=1e30", *every, f"hydra.run.dir={job}"])
    assert proc.returncode != 0
    assert "at step 2" in proc.stderr and "loss is" in proc.stderr, proc.stderr[-2000:]
    assert [s for s, _ in complete_checkpoints(job)] == kept
    assert "eval step" not in proc.stderr + (job / "train.log").read_text()
    assert not (job / "metrics.json").exists()
