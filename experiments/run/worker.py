"""What every rank runs. Workers load the job's frozen config; they never run Hydra or read argv."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from experiments.config.schema import FROZEN_CONFIG, load_frozen
from experiments.measure import flight
from experiments.measure.log import LOG_FILE, file_logger, setup_rank_logging
from experiments.run.nodes import check_one_job
from experiments.train import signals
from parallel.distenv import init_distributed, rank_env, select_device, set_threads
from parallel.loopback import LOOPBACK, PORT_FILE, PORT_FILE_ENV

JOB_DIR_KEY = "paralab/job_dir"


def main(job_dir: str, launcher_pid: int | None = None, frozen: str | None = None) -> float:
    """Entry point for every launcher (local, spawn, torchrun's agent).

    `launcher_pid`: the process that launched this rank (spawn, torchrun); the rank exits as soon
    as that process is gone, however it died, so no rank is ever left training as an orphan.
    `frozen`: the config text the launcher composed (else the job dir's frozen config is read).
    """
    path = Path(job_dir)
    if launcher_pid is not None or "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_launcher(launcher_pid, path)
    if launcher_pid is not None:
        # One node's store: rank 0 publishes its port here (parallel/loopback.py). Read per job: a
        # fork server started by an earlier job of a sweep hands its own environment on.
        os.environ[PORT_FILE_ENV] = str(path / PORT_FILE)
    if frozen is None and not (path / FROZEN_CONFIG).is_file():
        raise RankFailure(
            f"{path / FROZEN_CONFIG} does not exist on host {socket.gethostname()}: the job dir must "
            "be on a filesystem every node shares (same path), or this node's launcher must pass the config"
        )
    cfg = load_frozen(path, frozen)
    env = rank_env()
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    signals.install()
    _quiet_io_failures()
    if launcher_pid is not None:
        # Ctrl-C reaches every rank with the launcher: each stops at once (the launcher reports it).
        signal.signal(signal.SIGINT, _interrupted)
    device = select_device(cfg, env)
    set_threads(cfg, env)
    log = setup_rank_logging(path, env.rank)
    if cfg.train.deterministic and device.type == "cuda" and env.rank == 0:
        log.warning(
            "train.deterministic=true on CUDA: deterministic kernels and NaN-filled fresh memory slow "
            "every step, by an amount that differs by strategy; set train.deterministic=false to measure throughput"
        )
    joined = False
    try:
        flight.enable()
        init_distributed(env, device, cfg.launcher.timeout_s)
        joined = True
        flight.register(path, env.rank)
        if env.world_size > env.local_world_size:
            host, problem = check_one_job(cfg, path, env.rank)
            if problem:
                raise RankFailure(problem)
            log.info(
                "host %s, launcher.node_rank=%d, node %s of %d in the rendezvous, local rank %d",
                host,
                cfg.launcher.node_rank,
                os.environ.get("GROUP_RANK", "?"),
                env.world_size // env.local_world_size,
                env.local_rank,
            )
        # Imported by the rank (the fork server preloads it): the CLI imports this module to
        # launch ranks, and needs none of the training machinery (DTensor, FSDP, DCP) for that.
        from experiments.train.loop import train

        try:
            result = train(cfg, env, device, path, log)
        finally:
            dist.destroy_process_group()
    except KeyboardInterrupt:
        if launcher_pid is None:
            raise
        file_logger().warning("stopped by SIGINT")
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as e:
        failure = describe_failure(e, env.rank, cfg.launcher.timeout_s, joined, path, env.world_size)
        if failure is None:
            raise
        message, peer_lost = failure
        # The whole traceback goes to the log file; the terminal gets the launcher's one line.
        file_logger().error("%s", message, exc_info=e)
        if peer_lost and launcher_pid is not None:
            # Another rank died first: let the launcher see that death before this consequence of
            # it, so its summary blames the right rank.
            time.sleep(PEER_LOST_DELAY_S)
        raise RankFailure(message) from e
    if launcher_pid is not None and "TORCHELASTIC_RUN_ID" in os.environ:
        _leave_soon()
    return result


def spawn_entry(local_rank: int, job_dir: str, nprocs: int, launcher_pid: int | None = None) -> None:
    """torch.multiprocessing.spawn target: the env a launcher would set, in this child only."""
    os.environ.update(
        MASTER_ADDR=LOOPBACK,  # the ranks' store then binds loopback only (distenv._attempt_store)
        MASTER_PORT="0",  # rank 0 binds a free port and publishes it (parallel/loopback.py)
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    main(job_dir, launcher_pid)


# ---- Faults: a rank never outlives its launcher, and says in one line why it failed. ----

PR_SET_PDEATHSIG = 1
PEER_LOST_DELAY_S = 1.0
RESULT_LINGER_S = 2.0


def _quiet_io_failures() -> None:
    """A full disk fails TensorBoard's writer thread and log writes: those go to the log (if it
    can take them), not as tracebacks to the terminal, where the launcher says it in one line."""
    logging.raiseExceptions = False

    def to_log(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        file_logger().error("thread %s failed: %r", name, args.exc_value)

    threading.excepthook = to_log


class RankFailure(RuntimeError):
    """A rank failed in a way paralab can name (a collective timed out, a peer vanished)."""


def _interrupted(signum: int, frame: object) -> None:
    # One Ctrl-C is enough: the launcher forwards it again, and that must not interrupt the exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def exit_with_launcher(launcher_pid: int | None, job_dir: Path) -> None:
    """Die with the launching process, even when it is SIGKILLed.

    PR_SET_PDEATHSIG covers a rank whose parent is the launcher (start_method=spawn, hand-run
    torchrun). Under forkserver the parent is the fork server, which lives as long as any rank
    does, so a thread also waits on a pidfd of the launcher itself and ends this rank when it exits.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass
    if launcher_pid is None:
        return
    try:
        fd: int | None = os.pidfd_open(launcher_pid)
    except ProcessLookupError:
        _launcher_gone(launcher_pid, job_dir)
    except (AttributeError, OSError):  # no pidfd (old kernel): poll instead
        fd = None
    threading.Thread(
        target=_watch_launcher, args=(launcher_pid, fd, job_dir), name="paralab-launcher-watch", daemon=True
    ).start()


def _leave_soon() -> None:
    """Exit shortly after returning, even if torch's agent never collects this rank's result.

    Under torch's agent a returning rank puts its result on a queue, then waits for the agent to
    have read every rank's. An agent that is shutting down (SIGTERM: the ranks stop with a
    checkpoint and return) reads none, and would wait `grace_s` to SIGKILL ranks that are done.
    """

    def leave() -> None:
        time.sleep(RESULT_LINGER_S)  # the result is on the queue's pipe by now: the agent can read it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    threading.Thread(target=leave, name="paralab-leave", daemon=True).start()


def _watch_launcher(pid: int, fd: int | None, job_dir: Path) -> None:
    if fd is not None:
        select.select([fd], [], [])  # readable once the process has exited
    else:
        while os.path.exists(f"/proc/{pid}") and not _is_zombie(pid):
            time.sleep(0.5)
    _launcher_gone(pid, job_dir)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _launcher_gone(pid: int, job_dir: Path) -> None:
    # Raw write + os._exit: the main thread may hold any lock or sit in a collective forever.
    rank, now = os.environ.get("RANK", "?"), time.strftime("%H:%M:%S")
    line = f"[rank{rank}] {now} ERROR launcher process {pid} is gone; this rank exits\n"
    try:
        fd = os.open(job_dir / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, line.encode())
        os.close(fd)
    except OSError:
        pass
    os._exit(128 + signal.SIGKILL)


_COMM = re.compile(r"gloo|nccl|c10d|ProcessGroup", re.IGNORECASE)
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_LOST = re.compile(
    r"connection (closed|reset)|broken pipe|connection refused|end of file|\bEOF\b|socket closed",
    re.IGNORECASE,
)


def describe_failure(
    e: BaseException,
    rank: int,
    timeout_s: float,
    joined: bool = True,
    job_dir: Path | None = None,
    world: int = 1,
) -> tuple[str, bool] | None:
    """One line for a communication failure (and whether a peer died first), or None for others.

    `joined`: whether the rank got past init_process_group (else the rendezvous is what failed).
    A collective's timeout in a job dir is diagnosed across the ranks (experiments/measure/flight.py).
    """
    text = str(e)
    if not (isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and _COMM.search(text))):
        return None
    if not (_TIMEOUT.search(text) or _PEER_LOST.search(text)):
        return None
    if joined:
        op = flight.describe(flight.last_collective(), "a collective")
    else:
        op = "init_process_group (the ranks' rendezvous)"
    if _TIMEOUT.search(text) and joined and job_dir is not None:
        return f"rank {rank}: {flight.diagnose_and_end(job_dir, rank, world, timeout_s)}", False
    if _TIMEOUT.search(text):
        return (
            f"rank {rank}: {op} timed out after {timeout_s:g} s waiting for a peer rank "
            f"(launcher.timeout_s={timeout_s:g}); a rank is stuck, stopped or gone",
            False,
        )
    return f"rank {rank}: lost its connection to a peer rank in {op}; another rank died first", True


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
