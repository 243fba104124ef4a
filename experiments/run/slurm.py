"""SLURM through Hydra's submitit launcher: one SLURM job per sweep job, one torch agent per node.

`python train.py -m hydra/launcher=submitit_slurm strategy=ddp,fsdp launcher.nnodes=2` asks
SLURM, for each sweep job, for `launcher.nnodes` nodes with one task each; each task runs this
Hydra job on its node, which starts torch's elastic agent (launcher=torchrun) with the node's
`launcher.nproc_per_node` ranks, all nodes meeting at a rendezvous on the allocation's first
host. Node 0's task returns the job's objective (train.objective) to the sweeper, as a local
sweep does.

Validation runs in the SLURM job, on a compute node: a login node without GPUs never judges
`train.device`. Needs the optional extra `.[slurm]` (hydra-submitit-launcher).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import zlib
from collections.abc import Iterator
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from experiments.config.schema import ConfigError

SWEPT_KEYS_ENV = "PARALAB_SWEPT_KEYS"  # the swept keys, for job dir names inside SLURM jobs
MAX_TIMEOUTS = "hydra.launcher.max_num_timeout"
REQUEUES_ON_TIME_LIMIT = 20


def submitit_launcher(cfg: DictConfig) -> bool:
    return "hydra_submitit_launcher" in str(cfg.hydra.launcher.get("_target_", ""))


def slurm_gpus_per_node(launcher: Any, device: str) -> int:
    """GPUs to request per node: launcher.gpus_per_node, or by default one per rank unless train.device=cpu.

    A default of 0 would leave train.device=auto quietly training on CPU/gloo on a GPU cluster.
    """
    if launcher.gpus_per_node >= 0:
        return int(launcher.gpus_per_node)
    return 0 if device == "cpu" else int(launcher.nproc_per_node)


class SubmititResources(Callback):
    """Before the launcher is built: size each SLURM job from the launcher group (nodes, GPUs)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not submitit_launcher(config):
            return
        from experiments.run.jobdir import swept_keys

        launcher = config.launcher
        with read_write(config.hydra), open_dict(config.hydra.launcher):
            if not any(a.split("=", 1)[0].lstrip("+") == MAX_TIMEOUTS for a in sys.argv[1:]):
                # submitit's default (0) ends a job at its first time limit: requeue it instead,
                # to resume where the limit's warning (USR2) made it save.
                config.hydra.launcher.max_num_timeout = REQUEUES_ON_TIME_LIMIT
            config.hydra.launcher.nodes = launcher.nnodes
            config.hydra.launcher.tasks_per_node = 1  # one agent per node; it starts the ranks
            config.hydra.launcher.gpus_per_node = slurm_gpus_per_node(launcher, config.train.device)
        # A SLURM job's argv is submitit's, not the user's: pass the swept keys on (sbatch and
        # the local executor both hand the environment to the job).
        os.environ[SWEPT_KEYS_ENV] = "\n".join(swept_keys(sys.argv[1:], config.hydra.sweeper.get("params")))


def check_submitit_installed(argv: list[str]) -> None:
    """hydra/launcher=submitit_* without the extra: say what to install, not Hydra's 'not found'."""
    if not any(a.startswith("hydra/launcher=submitit") for a in argv):
        return
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        print(
            "paralab: config error: hydra/launcher=submitit_* needs the optional extra: pip install -e '.[slurm]'",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _submission_errors() -> tuple[type[BaseException], ...]:
    try:
        from submitit.core.utils import FailedJobError
    except ImportError:  # the extra is not installed: nothing is submitted either
        return ()
    return (FailedJobError,)


SUBMISSION_ERRORS = _submission_errors()


def submission_error_line(e: BaseException) -> str:
    """sbatch's own complaint, in one line, with the fix where paralab knows it."""
    said = next((ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()), str(e).strip())
    hint = ""
    if "gres" in said.lower():
        hint = "; a job asks for one GPU per rank unless train.device=cpu (or launcher.gpus_per_node=0)"
    return f"SLURM refused the sweep's jobs: {said}{hint}"


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def place_on_allocation(cfg: DictConfig) -> None:
    """Inside a submitit job: this node's place in the job's rendezvous, from the allocation."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks != env.num_nodes:
        raise ConfigError(
            f"this SLURM job runs {env.num_tasks} tasks on {env.num_nodes} node(s); paralab starts one "
            "agent per node: leave hydra.launcher.tasks_per_node unset (1)"
        )
    if env.num_nodes != cfg.launcher.nnodes:
        raise ConfigError(
            f"launcher.nnodes={cfg.launcher.nnodes} but this SLURM job has {env.num_nodes} node(s): "
            "one sweep submits one allocation size, so launcher.nnodes cannot be swept here"
        )
    if cfg.launcher.name in ("local", "spawn") and env.num_nodes > 1:
        raise ConfigError(f"launcher={cfg.launcher.name} is single-node; use launcher=torchrun")
    with open_dict(cfg):
        cfg.launcher.node_rank = env.node
        if env.num_nodes > 1:
            # Every node derives the same port from the job id; the job owns its nodes meanwhile.
            port = 20000 + zlib.crc32(env.job_id.encode()) % 20000
            cfg.launcher.rdzv_endpoint = f"{env.hostnames[0]}:{port}"
            cfg.launcher.rdzv_id = f"paralab-{env.job_id}"


@contextlib.contextmanager
def save_at_usr2() -> Iterator[None]:
    """Under submitit, while the ranks run: USR2 (SLURM's warning before the time limit, or a
    preemption) stops them with a checkpoint at their next log step, as SIGTERM does, and only
    then does submitit's own handler requeue the job. Left to submitit alone, it requeues at once
    and the ranks die unsaved: the requeued job resumes from the last periodic checkpoint."""
    if not under_submitit():
        yield
        return
    requeue = signal.getsignal(signal.SIGUSR2)
    got: list[int] = []

    def stop_then_requeue(signum: int, frame: object) -> None:
        got.append(signum)
        # The launcher's stop: torch's agent passes SIGTERM to the ranks and waits for them.
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR2, stop_then_requeue)
    try:
        yield
    except SystemExit:
        if got and callable(requeue):
            signal.signal(signal.SIGUSR2, requeue)
            requeue(signal.SIGUSR2, None)  # submitit: requeue (its checkpoint()), then exit
        raise
    finally:
        signal.signal(signal.SIGUSR2, requeue)


def swept_keys_from_env() -> list[str] | None:
    keys = os.environ.get(SWEPT_KEYS_ENV)
    return None if keys is None else [k for k in keys.split("\n") if k]
