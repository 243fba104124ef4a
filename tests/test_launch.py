"""Real launchers, real processes: one job dir, per-rank TensorBoard, sweeps that never replay."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from experiments.report.parity import run_case
from tests.helpers import REPO, TINY, run, tb_scalars, train

REQUIRED_SCALARS = {
    "loss/train",
    "lr",
    "perf/step_time_s",
    "perf/samples_per_s",
    "perf/data_time_s",
    "grad_norm",
}


def check_two_rank_job(job, m: dict, launcher: str) -> None:
    assert m["strategy"] == "ddp" and m["world_size"] == 2 and m["launcher"] == launcher
    assert len(m["losses"]) == 6 and m["final_loss"] == m["losses"][-1]
    assert m["samples_per_s"] > 0 and m["wall_s"] > 0
    assert sorted(p.name for p in (job / "tb").iterdir() if p.name.startswith("rank")) == ["rank0", "rank1"]
    assert (job / "tb" / "hparams").is_dir()
    for r in (0, 1):
        scalars = tb_scalars(job / "tb" / f"rank{r}")
        assert REQUIRED_SCALARS <= scalars.keys()
        # Every rank logs the same global loss, and it is the one in metrics.json.
        assert scalars["loss/train"] == pytest.approx(m["losses"], rel=1e-6)
    log = (job / "train.log").read_text()
    assert "[rank0]" in log and "[rank1]" in log
    assert (job / "config.resolved.yaml").is_file()


def test_ddp_two_ranks_through_the_cli_writes_one_complete_job_dir(tmp_path):
    job = tmp_path / "job"
    m = train(job, "strategy=ddp", "launcher=torchrun", "launcher.nproc_per_node=2")
    check_two_rank_job(job, m, "torchrun")
    assert (job / ".hydra" / "config.yaml").is_file()


def test_ddp_two_ranks_through_spawn(tmp_path):
    # The launcher itself, from this process (the CLI around it is tested above).
    job = tmp_path / "job"
    m = run_case(["strategy=ddp", "launcher=spawn", "launcher.nproc_per_node=2", *TINY], job)
    check_two_rank_job(job, m, "spawn")


def test_default_experiment_learns(tmp_path):
    m = run_case(["train.steps=100"], tmp_path / "job")
    assert m["strategy"] == "ddp" and m["world_size"] == 2 and m["launcher"] == "torchrun"
    assert m["final_loss"] < 0.6 * m["losses"][0], "the default experiment should clearly learn"


@pytest.mark.parametrize(
    "overrides",
    [
        # ResNet-18 trains in make test's parity matrix (ddp, synchronised BatchNorm): fitting a
        # batch with plain BatchNorm is make test-full's.
        pytest.param(
            [
                "strategy=single",
                "launcher=local",
                "model=resnet18",
                "dataset=fake_images",
                "dataset.input_shape=[3,16,16]",
                "train.lr=0.01",
            ],
            marks=pytest.mark.full,
        ),
        [
            "strategy=ddp",
            "model=cnn",
            "dataset=fake_images",
            "dataset.input_shape=[1,28,28]",
            "model.channels=4",
            "train.lr=0.05",
        ],
        [
            "strategy=fsdp",
            "launcher.nproc_per_node=2",
            "strategy.mp_param_dtype=bf16",
            "train.precision=bf16",
        ],
    ],
    ids=["resnet18", "cnn-ddp", "fsdp-bf16-policy"],
)
def test_more_models_and_options_train(tmp_path, overrides):
    """Fit one fixed batch at a stable learning rate: what holds on any CPU, and fails if training is broken.

    A bound on a diverging run (ResNet-18 with BatchNorm at lr 0.1) depends on the CPU's float kernels;
    the loss of a freshly initialised classifier and the fall of a stable run do not.
    """
    tiny = [
        o for o in TINY if not o.startswith(("dataset.input_shape", "train.steps", "dataset.num_samples"))
    ]
    batch = ["train.global_batch_size=8", "dataset.num_samples=8", "train.steps=10"]
    m = run_case([*tiny, *batch, *overrides], tmp_path / "job")
    losses = m["losses"]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses), losses
    assert abs(losses[0] - math.log(10)) < 1.0, f"first loss {losses[0]} is far from ln(10): a broken init"
    assert losses[-1] < 0.9 * losses[0], f"one fixed batch was not fitted: {losses}"


def test_local_launcher_runs_in_process(tmp_path):
    m = train(tmp_path / "job", "strategy=single", "launcher=local")
    assert m["world_size"] == 1 and len(m["losses"]) == 6


def test_torchrun_started_by_hand_makes_exactly_one_job_dir(tmp_path):
    # Default hydra.run.dir has a timestamp: if every rank ran Hydra, ranks could disagree on it.
    proc = run(
        ["strategy=ddp", *TINY],
        cwd=tmp_path,
        module=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs
    m = json.loads((runs[0] / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert sorted(p.name for p in (runs[0] / "tb").iterdir() if p.name.startswith("rank")) == [
        "rank0",
        "rank1",
    ]


def test_torchrun_by_hand_with_a_bad_config_exits_nonzero(tmp_path):
    proc = run(
        ["strategy=single", *TINY],
        cwd=tmp_path,
        module=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    )
    assert proc.returncode != 0
    assert "paralab: config error: strategy=single runs in one process" in proc.stderr


def test_multirun_one_dir_per_valid_job_named_from_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(
        ["-m", "strategy=single,ddp", "launcher.nproc_per_node=1,2", *TINY, f"hydra.sweep.dir={sweep}"],
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [
        "strategy=ddp,launcher.nproc_per_node=1",
        "strategy=ddp,launcher.nproc_per_node=2",
        "strategy=single,launcher.nproc_per_node=1",
    ]
    assert "skipped job" in proc.stderr and "strategy=single" in proc.stderr
    for name in jobs:
        m = json.loads((sweep / name / "metrics.json").read_text())
        assert m["world_size"] == int(name[-1])
        assert len(list((sweep / name / "tb").glob("rank*"))) == m["world_size"]
    # The sweep ran once: a child rank that replayed it would launch it again.
    assert proc.stdout.count("Launching 4 jobs locally") + proc.stderr.count("Launching 4 jobs locally") == 1
    # Same seed, same global batch: the three valid jobs trained the same trajectory.
    losses = [json.loads((sweep / n / "metrics.json").read_text())["losses"] for n in jobs]
    assert losses[0] == pytest.approx(losses[2], rel=1e-5) and losses[1] == pytest.approx(losses[2], rel=1e-5)


def test_a_forked_rank_imports_nothing_the_fork_server_could_have():
    """What every rank runs before training imports nothing new after the fork server's preload:
    an import there is paid again by every rank of every job (torch.use_deterministic_algorithms
    importing torch._inductor.config was a third of a tiny 4-rank job's CPU)."""
    code = (
        "import sys, importlib, torch\n"
        "from experiments.run.launch import FORKSERVER_PRELOAD\n"
        "for m in FORKSERVER_PRELOAD: importlib.import_module(m)\n"
        "before = set(sys.modules)\n"
        "torch.use_deterministic_algorithms(True, warn_only=True)\n"
        "from experiments.train.loop import train  # what worker.main imports in the rank\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
