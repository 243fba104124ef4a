"""Where this process sits in the world, read from the launcher's environment (never from argv)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import parse_qsl, urlparse

import torch
import torch.distributed as dist

from experiments.config.schema import Config
from parallel.loopback import is_loopback, loopback_store, set_loopback_env


@dataclass(frozen=True)
class RankEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def rank_env() -> RankEnv:
    # torchrun/spawn set RANK & co. (under SLURM too: each node runs torch's agent).
    world = _env_int("WORLD_SIZE", default=1)
    return RankEnv(
        rank=_env_int("RANK", default=0),
        local_rank=_env_int("LOCAL_RANK", default=0),
        world_size=world,
        local_world_size=_env_int("LOCAL_WORLD_SIZE", default=world),
    )


def check_gpus(device: str, nproc_per_node: int, gpus: int) -> str:
    """Why this node cannot give each local rank a GPU of its own ('' = it can)."""
    if device == "cuda" and gpus == 0:
        return "train.device=cuda but no CUDA device is visible; use train.device=auto or cpu"
    if device in ("auto", "cuda") and 0 < gpus < nproc_per_node:
        return (
            f"launcher.nproc_per_node={nproc_per_node} but this node has {gpus} GPU(s) and "
            f"train.device={device} gives each local rank its own: use launcher.nproc_per_node<={gpus}, "
            "or train.device=cpu to run every rank on CPU/gloo"
        )
    return ""


def uses_cuda(device: str) -> bool:
    """Whether train.device (cuda | auto | cpu) puts the ranks on GPUs here."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def select_device(cfg: Config, env: RankEnv) -> torch.device:
    if uses_cuda(cfg.train.device):
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def set_threads(cfg: Config, env: RankEnv) -> None:
    """Split the cores among local ranks so oversubscribed CPU runs do not thrash."""
    n = cfg.launcher.threads_per_rank or max(1, (os.cpu_count() or 1) // env.local_world_size)
    torch.set_num_threads(n)


def init_distributed(env: RankEnv, device: torch.device, timeout_s: float | None = None) -> None:
    """Join the world. `timeout_s` bounds every collective: a peer that stops answering is an error."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        # In-process single rank (launcher=local): no port, no env vars left behind for the next job.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("MASTER_ADDR/MASTER_PORT are not set; start workers through a paralab launcher")
    dist.init_process_group(
        backend,
        rank=env.rank,
        world_size=env.world_size,
        device_id=device if device.type == "cuda" else None,
        timeout=timeout,
        store=_attempt_store(timeout),
    )


def _attempt_store(timeout: timedelta | None) -> dist.Store | None:
    """Under torch's agent: its store, under a prefix of its own for each restart of the group.

    Every attempt of a restarted worker group rendezvous in the agent's one TCPStore, under the
    same keys; without a prefix a new rank can read the address a dead rank of the previous
    attempt published there, and fail to connect or connect to the wrong process.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        if is_loopback(os.environ["MASTER_ADDR"]):
            # One node: this job's store and gloo/NCCL sockets listen on loopback only. spawn's
            # launcher sets nothing for its ranks; this must run before init_process_group makes gloo.
            set_loopback_env()
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            port = int(os.environ["MASTER_PORT"])
            return loopback_store(port, world, rank == 0, timeout or timedelta(minutes=30))
        return None  # init_process_group's own env:// rendezvous
    return dist.PrefixStore(_attempt_prefix(), _job_store_client(timeout or timedelta(minutes=30)))


def _attempt_prefix() -> str:
    return f"paralab/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _job_store_client(timeout: timedelta) -> dist.TCPStore:
    """One more connection to the store the process group met in (the agent's, or rank 0's)."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )


JOB_STORE_SCHEME = "paralab-job-store"


def _job_store_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **_: object):
    """torch.distributed.rendezvous for `paralab-job-store://<name>`: the job's store under a
    prefix of its own; rendezvous() adds this rank and the world size to the query."""
    parsed = urlparse(url)
    query = dict(parse_qsl(parsed.query))
    store = dist.PrefixStore(f"{_attempt_prefix()}/{parsed.netloc}", _job_store_client(timeout))
    yield store, int(query["rank"]), int(query["world_size"])
    raise RuntimeError(f"{JOB_STORE_SCHEME}:// cannot rendezvous again")


def job_store_init_method(name: str) -> str:
    """An init_method for what rendezvous on its own (RPC): it meets in the job's store, which
    listens already, instead of on a port picked now and bound later, which another process
    on the machine can take in between."""
    with contextlib.suppress(RuntimeError):  # registered by an earlier call in this process
        dist.register_rendezvous_handler(JOB_STORE_SCHEME, _job_store_rendezvous)
    return f"{JOB_STORE_SCHEME}://{name}"
