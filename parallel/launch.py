"""Start the ranks of one job: local, torch.multiprocessing.spawn, torch's elastic agent, or SLURM."""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from experiments.config import ConfigError, LauncherConfig

LAUNCHERS = ("local", "spawn", "torchrun", "slurm")


def free_port() -> int:
    """A port nobody listens on now; every job gets its own rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_launcher(cfg: LauncherConfig) -> None:
    if cfg.name not in LAUNCHERS:
        raise ConfigError(f"unknown launcher '{cfg.name}'; choose one of: {', '.join(LAUNCHERS)}")
    if cfg.nproc_per_node < 1 or cfg.nnodes < 1:
        raise ConfigError(
            f"launcher.nproc_per_node={cfg.nproc_per_node} and launcher.nnodes={cfg.nnodes} must both be >= 1"
        )
    if not 0 <= cfg.node_rank < cfg.nnodes:
        raise ConfigError(f"launcher.node_rank={cfg.node_rank} must be in [0, launcher.nnodes={cfg.nnodes})")
    if cfg.name == "local" and cfg.nproc_per_node * cfg.nnodes != 1:
        raise ConfigError("launcher=local runs one process; use launcher=spawn or launcher=torchrun for more")
    if cfg.name == "spawn" and cfg.nnodes != 1:
        raise ConfigError(
            "launcher=spawn is single-node; use launcher=torchrun or launcher=slurm for nnodes > 1"
        )
    if cfg.nnodes > 1 and cfg.name == "torchrun" and not cfg.rdzv_endpoint:
        raise ConfigError("multi-node torchrun needs launcher.rdzv_endpoint=<host of node 0>:<port>")
    if cfg.rdzv_backend not in ("c10d", "static"):
        raise ConfigError(f"launcher.rdzv_backend={cfg.rdzv_backend}; choose c10d or static")
    if cfg.name == "slurm" and cfg.submit and shutil.which("sbatch") is None:
        raise ConfigError(
            "launcher=slurm needs sbatch on PATH; set launcher.submit=false to only write the script"
        )
    if cfg.start_method not in ("spawn", "forkserver"):
        raise ConfigError(f"launcher.start_method={cfg.start_method}; choose forkserver or spawn")
    if cfg.max_restarts < 0:
        raise ConfigError(f"launcher.max_restarts={cfg.max_restarts} must be >= 0")


def _preload_forkserver(cfg: LauncherConfig) -> None:
    # The fork server imports torch and paralab once; every rank of every job in a sweep is then a
    # cheap fork of it instead of a fresh interpreter importing torch again (seconds per rank).
    if cfg.start_method == "forkserver":
        import multiprocessing

        multiprocessing.get_context("forkserver").set_forkserver_preload(["experiments.worker"])


def launch(cfg: LauncherConfig, job_dir: Path) -> None:
    from experiments import worker

    _preload_forkserver(cfg)
    if cfg.name == "local":
        worker.main(str(job_dir))
    elif cfg.name == "spawn":
        import torch.multiprocessing as mp

        mp.start_processes(
            worker.spawn_entry,
            args=(str(job_dir), cfg.nproc_per_node, free_port()),
            nprocs=cfg.nproc_per_node,
            start_method=cfg.start_method,
        )
    elif cfg.name == "torchrun":
        _elastic(cfg, job_dir, worker.main)
    else:
        submit_slurm(cfg, job_dir)


def _elastic(cfg: LauncherConfig, job_dir: Path, entry) -> None:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    endpoint = cfg.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    rdzv_configs: dict[str, object] = {}
    if cfg.rdzv_backend == "static":
        rdzv_configs["rank"] = cfg.node_rank
    config = LaunchConfig(
        min_nodes=cfg.nnodes,
        max_nodes=cfg.nnodes,
        nproc_per_node=cfg.nproc_per_node,
        run_id=cfg.rdzv_id or ("paralab" if cfg.nnodes > 1 else uuid.uuid4().hex),
        rdzv_backend=cfg.rdzv_backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=cfg.max_restarts,
        monitor_interval=0.1,
        start_method=cfg.start_method,
        logs_specs=DefaultLogsSpecs(log_dir=str(job_dir / "torchrun"), redirects=Std.NONE, tee=Std.NONE),
    )
    elastic_launch(config, entry)(str(job_dir))


def slurm_script(cfg: LauncherConfig, job_dir: Path) -> str:
    gpus = f"#SBATCH --gpus-per-node={cfg.gpus_per_node}\n" if cfg.gpus_per_node else ""
    part = f"#SBATCH --partition={cfg.partition}\n" if cfg.partition else ""
    return (
        "#!/bin/bash\n"
        f"#SBATCH --job-name=paralab\n#SBATCH --nodes={cfg.nnodes}\n"
        f"#SBATCH --ntasks-per-node={cfg.nproc_per_node}\n#SBATCH --time={cfg.time_min}\n"
        f"{gpus}{part}#SBATCH --output={job_dir}/slurm-%j.out\n"
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n"
        f"cd {shlex.quote(str(Path.cwd()))}\n"
        f"srun {shlex.quote(sys.executable)} -m experiments.worker {shlex.quote(str(job_dir))}\n"
    )


def submit_slurm(cfg: LauncherConfig, job_dir: Path) -> None:
    script = job_dir / "slurm.sbatch"
    script.write_text(slurm_script(cfg, job_dir))
    if not cfg.submit:
        print(f"paralab: wrote {script} (launcher.submit=false, not submitted)")
        return
    out = subprocess.run(["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True)
    print(f"paralab: submitted SLURM job {out.stdout.strip()} ({script})")
