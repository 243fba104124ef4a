"""Run paralab the way a user does: `python train.py ...` in a subprocess, then read its job dir."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Small enough that a 4-rank job on 2 cores finishes in seconds.
# No model keys: each model takes its own (model=cnn has no model.hidden), and the default
# MLP is small already.
TINY = [
    "train.steps=6",
    "train.global_batch_size=16",
    "train.log_every=2",
    "dataset.num_samples=256",
    "dataset.input_shape=[8]",
    # The advisor's prediction (~0.2 s a job) is checked where it is the subject: test_measure's
    # communication matrix, test_compare, test_plan.
    "train.predict=false",
]


# Activation bytes measured against predicted (experiments/measure/activation_theory.py), for
# paralab's own models: exact for every block; the loss's few scalars are not predicted (0.3 % of
# the tests' small totals in fp32, 1.2 % in fp64). Under a TP pipeline the last stage's head keeps
# one micro-batch's hidden state more than predicted (1.4 %, fsdp_tp_pp).
ACTIVATION_TOLERANCE = 0.02


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Nothing from a surrounding torchrun may leak into a test's fresh world.
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    env["HYDRA_FULL_ERROR"] = "0"
    return env


def run(
    args: list[str], cwd: Path = REPO, timeout: int = 240, module: list[str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(module or []), str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)


def train(job_dir: Path, *overrides: str, tiny: bool = True) -> dict:
    """Run one job into `job_dir`; fail with its output if it fails; return its metrics.json."""
    proc = run([*(TINY if tiny else []), *overrides, f"hydra.run.dir={job_dir}"])
    assert proc.returncode == 0, (
        f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads((job_dir / "metrics.json").read_text())


def compare(sweep_dir: Path) -> subprocess.CompletedProcess:
    """`python -m experiments.report.compare <sweep dir>`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.report.compare", str(sweep_dir)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def tb_scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def start_agents(job_dirs: list[Path], *overrides: str) -> list[subprocess.Popen]:
    """One torchrun agent per "node" on this machine (node 1 first), 2 ranks each, one rendezvous."""
    from parallel.loopback import free_port

    endpoint = f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}"
    common = ["strategy=ddp", "launcher.nnodes=2", endpoint, *TINY, *overrides]
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "train.py"),
                *common,
                f"launcher.node_rank={n}",
                f"hydra.run.dir={job_dirs[n]}",
            ],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 0)
    ][::-1]


class SharedJobs:
    """Jobs run once per test session and read by every test that needs them, whichever pytest
    worker (pytest-xdist) asks first: the others wait on a file lock for that job, then read the
    same job dir. Tests that only read a job's outputs share it; none may write into it."""

    def __init__(self, tmp_path_factory, kind: str) -> None:
        base = tmp_path_factory.getbasetemp()
        # Each xdist worker has its own base temp inside the session's: share the session's.
        session = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        self.root = session / "shared-jobs" / kind
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, overrides: list[str], run: Callable[[list[str], Path], dict]) -> tuple[dict, Path]:
        key = hashlib.sha1("\0".join(overrides).encode()).hexdigest()[:16]
        job, done = self.root / key, self.root / f"{key}.json"
        with open(self.root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, whatever happens
            if not done.exists():
                shutil.rmtree(job, ignore_errors=True)  # a run that failed in another worker
                done.write_text(json.dumps(run(list(overrides), job)))
        return json.loads(done.read_text()), job
