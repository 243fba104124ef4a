"""Preemption as SLURM does it, on a real one-node cluster (.ci/slurm-up: Debian's slurm-wlm and
munge, the three daemons on this machine), through hydra-submitit-launcher as a user runs it.

- `scancel` of a running sweep, then the same sweep again: every job finishes, each resumed from
  the step it stopped at, with the losses of an uninterrupted run.
- A job that reaches its time limit: SLURM's warning (USR2, `signal_delay_s` before the limit)
  makes the ranks save at their next log step; the job is requeued and resumes there.

`make test-slurm` (and `make test-full`) run these; the cluster needs root to start. They take
minutes of SLURM's own clock (its time limits count in minutes, checked every 30 s), so they are
not in `make test`. The work of each job is sized from a short run on this machine, so that a
job is still training when it is stopped, on a fast CPU or a slow one: only the size depends on
the clock, never what is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(
        importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
        reason="needs the optional extra: pip install -e '.[slurm]'",
    ),
]

BASE = [
    "launcher.nproc_per_node=2",
    "train.device=cpu",
    "train.log_every=20",
    "train.checkpoint_every=0",
    "train.measure_every=0",
    "train.eval_samples=0",
    "train.objective=train_loss",
    "model.hidden=256",
]
SLURM = ["hydra/launcher=submitit_slurm"]


@pytest.fixture(scope="module")
def cluster() -> None:
    up = (
        subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
        if shutil.which("sinfo")
        else None
    )
    if up is not None and up.returncode == 0 and up.stdout.strip() in ("idle", "mixed", "allocated"):
        return
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster here, and starting one (.ci/slurm-up) needs root")
    proc = subprocess.run([str(REPO / ".ci" / "slurm-up")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sweep_in_background(sweep_dir: Path, *args: str) -> subprocess.Popen:
    log = open(sweep_dir.parent / f"{sweep_dir.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "-m", *SLURM, *args, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO,
        env=child_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def steps_for(tmp_path: Path, seconds: float, *args: str) -> int:
    """Steps that take about `seconds` of training here, from the rate of a short run."""
    job = tmp_path / "calibrate"
    proc = train(*BASE, *args, "train.steps=100", f"hydra.run.dir={job}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((job / "metrics.json").read_text())
    return max(200, 20 * math.ceil(seconds * 100 / m["wall_s"] / 20))


def losses(job_dir: Path) -> list[float]:
    return json.loads((job_dir / "metrics.json").read_text())["losses"]


def slurm_jobs() -> list[tuple[str, str, int]]:
    """(job id, state, restarts) of every job SLURM holds."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout.split()
    jobs = []
    for job_id, state in zip(out[::2], out[1::2], strict=True):
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        restarts = int(shown.split("Restarts=")[1].split()[0]) if "Restarts=" in shown else 0
        jobs.append((job_id, state, restarts))
    return jobs


def wait_releasing_requeued(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for the sweep, releasing each requeued job as soon as it is pending: SLURM holds a
    requeued batch job two minutes before it may start again, a wait of its clock, not ours."""
    end = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < end, "the sweep did not finish"
        for job_id, state, restarts in slurm_jobs():
            if state == "PENDING" and restarts:
                subprocess.run(
                    ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True
                )
        time.sleep(1)
    return proc.returncode


def wait_for(what, timeout: float, why: str):
    end = time.monotonic() + timeout
    while (found := what()) is None:
        assert time.monotonic() < end, why
        time.sleep(0.5)
    return found


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_a_job_at_its_time_limit_saves_at_the_warning_is_requeued_and_resumes_there(cluster, tmp_path):
    # A one-minute limit; SLURM sends USR2 45 s before it (in practice at its 30 s check).
    steps = steps_for(tmp_path, 40)
    args = [*BASE, f"train.steps={steps}", "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=45"]
    sweep_dir = tmp_path / "sweep"
    proc = sweep_in_background(sweep_dir, *args)
    try:
        marker = wait_for(
            lambda: next(iter(sweep_dir.glob("*/interrupted.json")), None),
            240,
            "no stop at the time-limit warning",
        )
        stop = json.loads(marker.read_text())
        assert stop["signal"] == "SIGUSR2", stop
        assert wait_releasing_requeued(proc, 600) == 0, (sweep_dir.parent / "sweep.log").read_text()[-4000:]
    finally:
        proc.kill()
        subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
    (job,) = job_dirs(sweep_dir)
    m = json.loads((job / "metrics.json").read_text())
    assert len(m["losses"]) == steps
    # The requeued job resumed from the step the warning saved.
    assert stop["step"] in [r["from_step"] for r in m["resumes"]], m["resumes"]
    ref = tmp_path / "reference"
    proc = train(*BASE, f"train.steps={steps}", f"hydra.run.dir={ref}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert m["losses"] == losses(ref)


def test_scancel_of_a_sweep_then_the_same_sweep_again_finishes_every_job_as_uninterrupted(cluster, tmp_path):
    steps = steps_for(tmp_path, 30)
    args = [*BASE, "strategy=ddp,fsdp", f"train.steps={steps}"]
    sweep_dir = tmp_path / "sweep"
    proc = sweep_in_background(sweep_dir, *args)
    try:

        def both_training():
            logs = [d / "train.log" for d in job_dirs(sweep_dir)] if sweep_dir.exists() else []
            started = [p for p in logs if p.exists() and "INFO step " in p.read_text()]
            return True if len(started) == 2 else None

        wait_for(both_training, 240, "the sweep's two jobs did not both start training")
        subprocess.run(["scancel", "--user", str(os.getuid())], check=True)
        wait_for(lambda: True if not slurm_jobs() else None, 120, "the cancelled jobs did not end")
    finally:
        # Without SLURM's accounting (sacct), submitit cannot tell a cancelled job from a running
        # one, so the sweep process would wait on: end it, as its user would.
        proc.kill()
    stops = {}
    for job in job_dirs(sweep_dir):
        marker = job / "interrupted.json"
        stops[job.name] = json.loads(marker.read_text())["step"] if marker.exists() else None
        assert not (job / "metrics.json").exists(), "a job finished before scancel: size the work up"

    # The same sweep again: every job resumes where it stopped, or starts again, and finishes.
    proc = sweep_in_background(sweep_dir, *args)
    try:
        assert wait_releasing_requeued(proc, 600) == 0, (sweep_dir.parent / "sweep.log").read_text()[-4000:]
    finally:
        proc.kill()
    ref_dir = tmp_path / "reference"
    proc = train("-m", *args, f"hydra.sweep.dir={ref_dir}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in job_dirs(sweep_dir):
        m = json.loads((job / "metrics.json").read_text())
        if stops[job.name] is None:  # stopped before its first checkpoint: started again
            assert (job / "stopped_1").is_dir() and not m["resumes"], m["resumes"]
        else:
            assert [r["from_step"] for r in m["resumes"]] == [stops[job.name]], m["resumes"]
        assert m["losses"] == losses(ref_dir / job.name), job.name


def test_a_job_sbatch_refuses_is_one_line_with_the_fix(cluster, tmp_path):
    """This cluster has no GPUs: by default a job asks for one per rank, and sbatch refuses it."""
    proc = train("-m", *SLURM, "strategy=ddp", "train.steps=2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("paralab: SLURM refused the sweep's jobs: sbatch: error: "), last
    assert "train.device=cpu" in last and "Traceback" not in proc.stderr
