"""What every rank runs. Workers load the job's frozen config; they never run Hydra or read argv."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from experiments.config import load_frozen
from experiments.distenv import init_distributed, rank_env, select_device, set_threads
from experiments.log import setup_rank_logging
from experiments.loop import train

JOB_DIR_KEY = "paralab/job_dir"


def main(job_dir: str) -> float:
    """Entry point for every launcher (local, spawn, torchrun's agent, srun)."""
    path = Path(job_dir)
    cfg = load_frozen(path)
    env = rank_env()
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = select_device(cfg, env)
    set_threads(cfg, env)
    log = setup_rank_logging(path, env.rank)
    init_distributed(env, device)
    try:
        return train(cfg, env, device, path, log)
    finally:
        dist.destroy_process_group()


def spawn_entry(local_rank: int, job_dir: str, nprocs: int, port: int) -> None:
    """torch.multiprocessing.spawn target: the env a launcher would set, in this child only."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    main(job_dir)


# ---- `torchrun --nproc_per_node=N train.py ...` run by hand: rank 0 runs Hydra, the rest follow. ----


def launched_by_external_torchrun() -> bool:
    return "RANK" in os.environ and "LOCAL_RANK" in os.environ


def _agent_store() -> dist.TCPStore:
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise SystemExit(
            "paralab: RANK is set but no torchrun agent store is reachable; "
            "run `python train.py launcher=torchrun` or start this under torchrun"
        )
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(minutes=10),
    )


def _key() -> str:
    # A restarted worker group must not read the job dir published before the restart.
    return f"{JOB_DIR_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def publish_job_dir(job_dir: Path | None) -> None:
    """Rank 0: tell the other ranks where the job lives ('' = config rejected, exit)."""
    _agent_store().set(_key(), str(job_dir) if job_dir else "")


def follow_rank0() -> int:
    """Ranks > 0: wait for rank 0's job dir through the rendezvous store, then train in it."""
    job_dir = _agent_store().get(_key()).decode()
    if not job_dir:
        return 2
    main(job_dir)
    return 0


if __name__ == "__main__":
    # `srun python -m experiments.worker <job dir>`: each SLURM task is one rank.
    main(sys.argv[1])
