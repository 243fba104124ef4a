"""Beyond one machine: the checks that hold a multi-node job together, and SLURM through submitit.

The two-agent job itself (two "nodes" on this machine forming one 4-rank job) is in test_claims.py.
"""

from __future__ import annotations

import json
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.config.schema import ConfigError
from experiments.report.parity import compose_config
from experiments.run.nodes import node_problem
from tests.helpers import REPO, TINY, child_env, run, start_agents


def _plain(*overrides: str) -> dict:
    cfg = compose_config(["strategy=ddp", "launcher.nnodes=2", "launcher.rdzv_endpoint=h:1", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _rank0(job_dir: Path, config: dict, marker: str = "m") -> dict:
    (job_dir / marker).write_text("rank0")
    return {"host": "node0", "job_dir": str(job_dir), "marker": marker, "config": config}


def test_a_node_with_the_same_config_and_shared_job_dir_joins(tmp_path):
    mine = _plain("launcher.node_rank=1")
    assert node_problem(2, "node1", tmp_path, mine, _rank0(tmp_path, _plain("launcher.node_rank=0"))) == ""


def test_a_node_that_cannot_see_the_job_dir_says_it_needs_a_shared_filesystem(tmp_path):
    sent = _rank0(tmp_path, _plain())
    (tmp_path / "m").unlink()  # what a node with its own local disk at that path sees
    problem = node_problem(2, "node1", tmp_path, _plain(), sent)
    assert problem.startswith("rank 2 on host node1 cannot see") and "filesystem every node shares" in problem


def test_a_node_in_another_job_dir_is_named(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    problem = node_problem(3, "node1", other, _plain(), _rank0(tmp_path, _plain()))
    assert "runs in job dir" in problem and "same hydra.run.dir" in problem


def test_a_node_started_with_other_overrides_names_the_key(tmp_path):
    problem = node_problem(2, "node1", tmp_path, _plain("train.lr=0.2"), _rank0(tmp_path, _plain()))
    assert "train.lr=0.2" in problem and "train.lr=0.1" in problem and "same overrides" in problem


def finish(agents: list[subprocess.Popen]) -> list[str]:
    """Each agent's stderr once it has exited by itself (none may wait for a vanished peer)."""
    try:
        return [a.communicate(timeout=180)[1] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()


@pytest.mark.full  # 12 s here; the job itself is in make test (test_claims.py)
def test_two_agents_in_different_job_dirs_both_fail_with_one_line(tmp_path):
    """A node that is not in rank 0's job dir: every rank fails at the check, so no agent is left
    waiting for a peer, and each says what to fix."""
    agents = start_agents([tmp_path / "node0", tmp_path / "node1"])
    for a, err in zip(agents, finish(agents), strict=True):
        lines = [ln for ln in err.splitlines() if ln.startswith("paralab: ")]
        assert a.returncode == 1 and len(lines) == 1, err[-3000:]
        assert "runs in job dir" in lines[0] and "same hydra.run.dir" in lines[0], lines[0]
    assert not list(tmp_path.glob("node*/.paralab-node-check-*"))  # rank 0 cleaned its marker up


@pytest.mark.full  # 12 s here
def test_static_rendezvous_gives_node_k_the_kth_block_of_ranks(tmp_path):
    """With rdzv_backend=static, launcher.node_rank orders the nodes, whichever agent starts first."""
    job = tmp_path / "job"
    agents = start_agents([job, job], "launcher.rdzv_backend=static")
    for a, err in zip(agents, finish(agents), strict=True):
        assert a.returncode == 0, err[-3000:]
    placed = {}
    for line in (job / "train.log").read_text().splitlines():
        if "launcher.node_rank=" in line:
            placed[int(line.split("]")[0].removeprefix("[rank"))] = int(
                line.split("launcher.node_rank=")[1][0]
            )
    assert placed == {0: 0, 1: 0, 2: 1, 3: 1}


# ---- SLURM through Hydra's submitit launcher (the optional extra .[slurm]) ----

NO_SUBMITIT = "hydra-submitit-launcher is not installed (pip install -e '.[slurm]')"


def _need_submitit() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=NO_SUBMITIT)


def test_each_node_of_a_slurm_job_joins_one_rendezvous_on_the_first_host(monkeypatch):
    _need_submitit()
    from experiments.run.slurm import place_on_allocation

    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[03-04]",
    }
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    cfg = compose_config(["strategy=ddp", "launcher.nnodes=2"])
    place_on_allocation(cfg)
    assert cfg.launcher.node_rank == 1 and cfg.launcher.rdzv_id == "paralab-4242"
    host, port = cfg.launcher.rdzv_endpoint.split(":")
    assert host == "gpu03" and 20000 <= int(port) < 40000
    with pytest.raises(ConfigError, match="launcher.nnodes=1 but this SLURM job has 2 node"):
        place_on_allocation(compose_config(["strategy=ddp"]))


def test_slurm_sweep_submits_one_job_per_sweep_job_sized_from_the_launcher(tmp_path):
    """What reaches sbatch: a stand-in `sbatch` records each script and refuses it (no cluster here)."""
    _need_submitit()
    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    for name, body in (
        ("sbatch", f'cp "$1" "{scripts}/$(date +%s%N).sh"; echo "no cluster" >&2'),
        ("srun", ""),
    ):
        fake = bin_dir / name  # submitit looks for srun before it submits
        fake.write_text(f"#!/bin/sh\n{body}\nexit 1\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = child_env()
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=submitit_slurm"]
    cmd += ["strategy=ddp,fsdp", "launcher.nnodes=2", f"hydra.sweep.dir={tmp_path / 'sweep'}", *TINY]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0  # the stand-in refused the submission
    (script,) = [p.read_text() for p in scripts.iterdir()]  # one array submission: one job per sweep job
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=2", "--array=0-1"):
        assert f"#SBATCH {line}" in script, script
    assert "srun" in script and "submitit" in script


@pytest.mark.full  # ~14 s here: two jobs, each through submitit and torch's agent
def test_submitit_local_sweep_trains_every_job_and_returns_its_objective(tmp_path):
    """The submitit launcher end to end on this machine: each job runs torch's agent in its own
    submitit job, writes its job dir, and hands its objective (train.objective) back to the sweeper."""
    _need_submitit()
    sweep = tmp_path / "sweep"
    proc = run(
        ["-m", "hydra/launcher=submitit_local", "strategy=ddp,fsdp", *TINY, f"hydra.sweep.dir={sweep}"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    returned = {}
    for result in sweep.glob(".submitit/*/*_result.pkl"):
        status, job_return = pickle.loads(result.read_bytes())
        assert status == "success", job_return
        returned[Path(job_return.hydra_cfg.hydra.runtime.output_dir).name] = job_return.return_value
    assert sorted(returned) == ["strategy=ddp", "strategy=fsdp"]
    for name, objective in returned.items():
        m = json.loads((sweep / name / "metrics.json").read_text())
        # train.objective's default: the held-out loss.
        assert m["world_size"] == 2 and m["launcher"] == "torchrun" and objective == m["val_loss"]


def test_a_submitit_launcher_without_the_extra_says_what_to_install(tmp_path):
    env = child_env()
    env["PYTHONPATH"] = str(tmp_path)  # an empty hydra_plugins namespace shadows nothing; hide the real one
    (tmp_path / "hydra_plugins").mkdir()
    (tmp_path / "hydra_plugins" / "hydra_submitit_launcher.py").write_text("raise ImportError('hidden')\n")
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=submitit_slurm"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "pip install -e '.[slurm]'" in proc.stderr, proc.stderr[-2000:]
