"""One job across nodes: every node must run rank 0's config in one job dir that all nodes share.

Each node's agent composes its own config from its own command line and hands it to its ranks
explicitly (never by re-reading a file another node may be writing). After joining, the ranks
compare what they got with rank 0's and check that a file rank 0 just wrote in the job dir is
visible to them: a node started with other overrides, in another hydra.run.dir, or on a
filesystem the others do not see fails the whole job with one line saying what is missing,
instead of quietly writing its ranks' metrics and checkpoints where no one will look.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from experiments.config.schema import Config

# Keys that may differ between the nodes of one job (and between a run and its resumption).
PER_NODE = {("launcher", "node_rank")}


def first_difference(
    old: object, new: object, ignore: set[tuple[str, ...]], path: tuple[str, ...] = ()
) -> tuple[str, ...] | None:
    """The first key (sorted, depth first) whose value differs between two plain config trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if (*path, key) in ignore:
                continue
            found = first_difference(old.get(key), new.get(key), ignore, (*path, key))
            if found is not None:
                return found
        return None
    return None if old == new else path


def node_problem(rank: int, host: str, job_dir: Path, cfg: dict, rank0: dict) -> str:
    """What keeps this rank from joining rank 0's job ('' = nothing). `rank0` is what rank 0 sent."""
    where = f"rank {rank} on host {host}"
    there = f"rank 0 on host {rank0['host']}"
    if str(job_dir) != rank0["job_dir"]:
        return (
            f"{where} runs in job dir {job_dir}, {there} in {rank0['job_dir']}: start every node "
            "with the same hydra.run.dir, on a filesystem all nodes share"
        )
    if not (job_dir / rank0["marker"]).is_file():
        return (
            f"{where} cannot see {job_dir / rank0['marker']}, which {there} has just written: "
            f"launcher.nnodes={cfg['launcher']['nnodes']} needs hydra.run.dir on a filesystem every "
            "node shares (every rank writes its metrics, TensorBoard and checkpoint shards there)"
        )
    diff = first_difference(rank0["config"], cfg, PER_NODE)
    if diff is not None:
        key = ".".join(diff)
        mine, theirs = (
            OmegaConf.select(OmegaConf.create(cfg), key),
            OmegaConf.select(OmegaConf.create(rank0["config"]), key),
        )
        return (
            f"{where} was started with {key}={mine}, {there} with {key}={theirs}: "
            "start every node with the same overrides"
        )
    return ""


def check_one_job(cfg: Config, job_dir: Path, rank: int) -> tuple[str, str]:
    """Collective: every rank learns the first rank's problem, if any, so all fail together.

    Returns this rank's host (for the log) and the first problem found on any rank ('' = none).
    """
    host = socket.gethostname()
    plain: dict = OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[assignment]
    sent: list[dict | None] = [None]
    marker = job_dir / f".paralab-node-check-{uuid.uuid4().hex}"
    if rank == 0:
        marker.write_text(host)
        sent = [{"host": host, "job_dir": str(job_dir), "marker": marker.name, "config": plain}]
    try:
        dist.broadcast_object_list(sent, src=0)
        problems: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, node_problem(rank, host, job_dir, plain, sent[0]))  # type: ignore[arg-type]
    finally:
        if rank == 0:
            marker.unlink(missing_ok=True)
    return host, next((p for p in problems if p), "")
