"""Start the ranks of one job: local, torch.multiprocessing.spawn or torch's elastic agent.

SLURM is reached through Hydra's submitit launcher (experiments/run/slurm.py), which runs one of these
on every node of an allocation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from experiments.config.schema import ConfigError, LauncherConfig
from parallel.loopback import free_port, fresh_port_file, loopback_only

LAUNCHERS = ("local", "spawn", "torchrun")


def check_launcher(cfg: LauncherConfig) -> None:
    if cfg.name not in LAUNCHERS:
        raise ConfigError(f"unknown launcher '{cfg.name}'; choose one of: {', '.join(LAUNCHERS)}")
    # Each key's own range is in experiments/config/ranges.py (checked before this); here, rules between keys.
    if not 0 <= cfg.node_rank < cfg.nnodes:
        raise ConfigError(f"launcher.node_rank={cfg.node_rank} must be in [0, launcher.nnodes={cfg.nnodes})")
    if cfg.name == "local" and cfg.nproc_per_node * cfg.nnodes != 1:
        raise ConfigError("launcher=local runs one process; use launcher=spawn or launcher=torchrun for more")
    if cfg.name == "spawn" and cfg.nnodes != 1:
        raise ConfigError("launcher=spawn is single-node; use launcher=torchrun for nnodes > 1")
    if cfg.nnodes > 1 and cfg.name == "torchrun" and not cfg.rdzv_endpoint:
        raise ConfigError("multi-node torchrun needs launcher.rdzv_endpoint=<host of node 0>:<port>")
    if cfg.rdzv_backend not in ("c10d", "static"):
        raise ConfigError(f"launcher.rdzv_backend={cfg.rdzv_backend}; choose c10d or static")
    if cfg.start_method not in ("spawn", "forkserver"):
        raise ConfigError(f"launcher.start_method={cfg.start_method}; choose forkserver or spawn")


# What the fork server imports once, so that no forked rank imports it again: the rank's entry,
# the training loop it imports, and torch._inductor.config, which every rank's call of
# torch.use_deterministic_algorithms imports (~0.5 s of CPU: a third of a 4-rank tiny job's).
# First, experiments.run.forkserver: the fork server survives a SIGTERM to the process group.
FORKSERVER_PRELOAD = [
    "experiments.run.forkserver",
    "experiments.run.worker",
    "experiments.train.loop",
    "torch._inductor.config",
]


def _preload_forkserver(cfg: LauncherConfig) -> None:
    # The fork server imports torch and paralab once; every rank of every job in a sweep is then a
    # cheap fork of it instead of a fresh interpreter importing torch again (seconds per rank).
    if cfg.start_method == "forkserver":
        import multiprocessing

        multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)


class JobFailed(SystemExit):
    """The ranks failed or were stopped. One line on stderr has said why; `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(code)
        self.message = message


def launch(cfg: LauncherConfig, job_dir: Path, frozen: str | None = None) -> None:
    """Run the job's ranks to the end. A failure or a stop request raises JobFailed (a SystemExit).

    `frozen`: the config text this process composed; torch's agent hands it to its ranks, so the
    ranks of every node run their own node's config (checked against rank 0's once they join).
    """
    from experiments.run import worker

    _preload_forkserver(cfg)
    started = time.time()
    from experiments.measure import flight

    flight.clear(job_dir)  # the ranks of an earlier run of this job dir may have left reports
    if cfg.name == "local":
        try:
            worker.main(str(job_dir))
        except KeyboardInterrupt:
            raise _stopped(signal.SIGINT, job_dir, started) from None
        except Exception as e:  # noqa: BLE001 - the one rank, in this process: say it as the others do
            import traceback

            when = time.strftime("%H:%M:%S")
            line = f"rank 0 failed (exit code 1) at {when}: {type(e).__name__}: {_last_line(e, 0)}"
            line += f"; details in {job_dir / 'train.log'}"
            _say(job_dir, line, traceback.format_exc())
            raise JobFailed(line, 1) from None
    elif cfg.name == "spawn":
        _spawn(cfg, job_dir, worker.spawn_entry, started)
    else:
        _elastic(cfg, job_dir, worker.main, started, frozen)


def _hang_line(job_dir: Path) -> str | None:
    """The ranks' diagnosis of a hang, if they made one: it names the stuck rank, which the first
    failure torch reports (a waiting rank's timeout, or the stuck one's death) does not."""
    from experiments.measure.flight import read_diagnosis

    line = read_diagnosis(job_dir)
    return None if line is None else f"{line}; details in {job_dir / 'train.log'}"


def _spawn(cfg: LauncherConfig, job_dir: Path, entry, started: float) -> None:
    with fresh_port_file(job_dir):
        _spawn_ranks(cfg, job_dir, entry, started)


def _spawn_ranks(cfg: LauncherConfig, job_dir: Path, entry, started: float) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        entry,
        args=(str(job_dir), cfg.nproc_per_node, os.getpid()),
        nprocs=cfg.nproc_per_node,
        start_method=cfg.start_method,
        join=False,
    )
    try:
        with _stop_signals(), _torch_logs_to(job_dir, cfg.grace_s):
            # On a failure join() waits grace_period for the others, SIGTERMs them, waits again, kills.
            while not ctx.join(grace_period=cfg.grace_s / 2):
                pass
    except _Stop as stop:
        _stop_processes(ctx.processes, stop.signum, cfg.grace_s)
        raise _stopped(stop.signum, job_dir, started) from None
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        _stop_processes(ctx.processes, signal.SIGKILL, 0)
        _raise_if_disk_full(job_dir)
        raise _spawn_failed(e, job_dir) from None


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM, SIGINT, SIGHUP raise _Stop in the launcher while its ranks run (as torch's agent does)."""
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {s: signal.signal(s, _raise_stop) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _stop_processes(processes, signum: int, grace_s: float) -> None:
    """Pass the stop request on to every rank, give them `grace_s` to stop on their own, then kill."""
    for p in processes:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signum)
    end = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, end - time.monotonic()))
    for p in processes:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        p.join(5)


def _elastic(cfg: LauncherConfig, job_dir: Path, entry, started: float, frozen: str | None) -> None:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from experiments.run.rendezvous import say_while_waiting
    from parallel.loopback import LOOPBACK

    endpoint = cfg.rdzv_endpoint or f"{LOOPBACK}:{free_port()}"
    rdzv_configs: dict[str, object] = {"join_timeout": cfg.join_timeout_s}
    if cfg.rdzv_backend == "static":
        rdzv_configs["rank"] = cfg.node_rank
    # One node: the rendezvous lives in a FileStore and the ranks' store on loopback (see
    # parallel/loopback.py): nothing of this job listens on the network.
    single = cfg.nnodes == 1 and not cfg.rdzv_endpoint and cfg.rdzv_backend == "c10d"
    store_dir = Path(tempfile.mkdtemp(prefix="paralab-rdzv-")) if single else None
    if store_dir is not None:
        rdzv_configs["store_type"] = "file"
    config = LaunchConfig(
        min_nodes=cfg.nnodes,
        max_nodes=cfg.nnodes,
        nproc_per_node=cfg.nproc_per_node,
        run_id=cfg.rdzv_id or ("paralab" if cfg.nnodes > 1 else uuid.uuid4().hex),
        rdzv_backend=cfg.rdzv_backend,
        rdzv_endpoint=str(store_dir / "store") if store_dir else endpoint,
        rdzv_configs=rdzv_configs,
        local_addr=LOOPBACK if store_dir else None,
        max_restarts=cfg.max_restarts,
        monitor_interval=0.1,
        start_method=cfg.start_method,
        logs_specs=DefaultLogsSpecs(log_dir=str(job_dir / "torchrun"), redirects=Std.NONE, tee=Std.NONE),
        shutdown_timeout=cfg.grace_s,
    )
    network = _one_node(job_dir) if store_dir else say_while_waiting(cfg, endpoint)
    try:
        with _torch_logs_to(job_dir, cfg.grace_s), _restored_signal_handlers(), network:
            elastic_launch(config, entry)(str(job_dir), os.getpid(), frozen)
    except ChildFailedError as e:
        raise _child_failed(e, job_dir) from None
    except RendezvousError as e:
        raise _rendezvous_failed(e, cfg, endpoint, job_dir) from None
    except (ValueError, OSError):  # e.g. torch reading a rank's error file that a full disk cut short
        _raise_if_disk_full(job_dir)
        raise
    except SignalException as e:
        # The agent has already passed the signal on to the ranks and waited for them to stop.
        raise _stopped(e.sigval, job_dir, started) from None
    finally:
        if store_dir is not None:
            shutil.rmtree(store_dir, ignore_errors=True)


@contextlib.contextmanager
def _one_node(job_dir: Path) -> Iterator[None]:
    """Loopback only, and the ranks' store port published in the job dir (parallel/loopback.py)."""
    with loopback_only(), fresh_port_file(job_dir):
        yield


@contextlib.contextmanager
def _restored_signal_handlers() -> Iterator[None]:
    # The agent turns these signals into SignalException for good; after it, a Ctrl-C between the
    # jobs of a sweep must be a plain KeyboardInterrupt again.
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    old = {s: signal.getsignal(s) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            if handler is not None:
                signal.signal(s, handler)


AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing.spawn")


class _KillAfterGrace(logging.Handler):
    """Bounds torch's wait for a rank that ignores SIGTERM after a failure to `grace_s`.

    When one rank fails, torch.multiprocessing SIGTERMs the others and waits a fixed 30 s before
    SIGKILL; a stopped or wedged rank holds the failed job that long. torch logs each SIGTERM
    ("Terminating process <pid> ..."): this handler then kills that process after `grace_s`.
    """

    def __init__(self, grace_s: float):
        super().__init__(logging.WARNING)
        self.grace_s = grace_s
        self.timers: list[threading.Timer] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("Terminating process") or not record.args:
            return
        try:
            pidfd = os.pidfd_open(int(record.args[0]))  # type: ignore[index]  # the pid cannot be reused
        except (OSError, ValueError, TypeError, AttributeError):
            return
        timer = threading.Timer(self.grace_s, _kill_pidfd, args=(pidfd,))
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    def close(self) -> None:
        for t in self.timers:
            t.cancel()
        super().close()


def _kill_pidfd(pidfd: int) -> None:
    with contextlib.suppress(OSError):  # ProcessLookupError: it has exited meanwhile
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.close(pidfd)


@contextlib.contextmanager
def _torch_logs_to(job_dir: Path, grace_s: float) -> Iterator[None]:
    """torch's launcher logs (failure tracebacks included) go to the job's train.log, not the terminal."""
    from experiments.measure.log import LOG_FILE

    to_file = logging.FileHandler(job_dir / LOG_FILE, mode="a")
    to_file.setFormatter(logging.Formatter("[agent] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    killer = _KillAfterGrace(grace_s)
    loggers = [logging.getLogger(name) for name in AGENT_LOGGERS]
    saved = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(to_file)
        lg.propagate = False
    loggers[-1].addHandler(killer)
    # A log write that fails (a full disk) must not print logging's own traceback over the one line.
    raising, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        yield
    finally:
        logging.raiseExceptions = raising
        loggers[-1].removeHandler(killer)
        for lg, propagate in zip(loggers, saved, strict=True):
            lg.removeHandler(to_file)
            lg.propagate = propagate
        to_file.close()
        killer.close()


# ---- What happened, in one line on stderr (the details are in <job dir>/train.log). ----


def _say(job_dir: Path, line: str, details: str = "") -> None:
    from experiments.measure.log import LOG_FILE

    with contextlib.suppress(OSError), open(job_dir / LOG_FILE, "a") as f:
        f.write(f"[launcher] {time.strftime('%H:%M:%S')} ERROR {line}\n{details}")
    print(f"paralab: {line}", file=sys.stderr, flush=True)


def _last_line(message: object, rank: int) -> str:
    """The exception line of a rank's error ("rank N: " and paralab's own exception name dropped)."""
    if isinstance(message, dict):  # torch's error file: {"message": ..., "extraInfo": {...}}
        message = message.get("message", "")
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    for prefix in ("experiments.run.worker.RankFailure: ", "RankFailure: ", f"rank {rank}: "):
        line = line.removeprefix(prefix)
    return line


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"died ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"died (signal {-exitcode})"
    if exitcode > 128:  # a rank that handled a signal and left with 128 + its number
        with contextlib.suppress(ValueError):
            return f"exited with code {exitcode} ({signal.Signals(exitcode - 128).name})"
    return f"failed (exit code {exitcode})"


def _raise_if_disk_full(job_dir: Path) -> None:
    """A full disk is the cause, whatever error it surfaced as: say that instead."""
    from experiments.run.resources import disk_full

    line = disk_full(job_dir)
    if line is not None:
        print(f"paralab: {line}", file=sys.stderr, flush=True)  # no _say: the log cannot grow
        raise JobFailed(line, 1)


def _child_failed(e, job_dir: Path) -> JobFailed:
    """torch's ChildFailedError as one line naming the rank that failed first and how."""
    _raise_if_disk_full(job_dir)
    hang = _hang_line(job_dir)
    if hang is not None:
        _say(job_dir, hang, e.format_msg() + "\n")
        return JobFailed(hang, 1)
    rank, failure = e.get_first_failure()
    when = time.strftime("%H:%M:%S", time.localtime(failure.timestamp))
    # A rank's own error (from its error file) explains the failure; a signal leaves no such file.
    reason = _last_line(failure.message, rank) if os.path.isfile(failure.error_file) else ""
    others = sorted(r for r in e.failures if r != rank)
    line = f"rank {rank} {_how(failure.exitcode)} at {when}" + (f": {reason}" if reason else "")
    if others:
        line += f"; then rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}"
    line += f"; details in {job_dir / 'train.log'}"
    _say(job_dir, line, e.format_msg() + "\n")
    return JobFailed(line, 1)


def _rendezvous_failed(e, cfg: LauncherConfig, endpoint: str, job_dir: Path) -> JobFailed:
    """The nodes never met: one line saying whom node N waited for, where, and for how long."""
    from torch.distributed.elastic.rendezvous import RendezvousTimeoutError

    if isinstance(e, RendezvousTimeoutError):
        line = (
            f"node {cfg.node_rank}: not all {cfg.nnodes} nodes joined at {endpoint} within "
            f"launcher.join_timeout_s={cfg.join_timeout_s}; start the same command on every node"
        )
    else:
        line = f"node {cfg.node_rank}: rendezvous at {endpoint} failed: {_last_line(e, -1)} (is node 0 up?)"
    _say(job_dir, line, f"{e!r}\n")
    return JobFailed(line, 1)


def _spawn_failed(e, job_dir: Path) -> JobFailed:
    """torch.multiprocessing's ProcessExitedException / ProcessRaisedException as one line."""
    import torch.multiprocessing as mp

    hang = _hang_line(job_dir)
    if hang is not None:
        _say(job_dir, hang, f"{e.msg}\n")
        return JobFailed(hang, 1)
    when = time.strftime("%H:%M:%S")
    if isinstance(e, mp.ProcessExitedException):
        line = f"rank {e.error_index} {_how(e.exit_code)} at {when}"
    else:
        line = f"rank {e.error_index} failed (exit code 1) at {when}: {_last_line(e.msg, e.error_index)}"
    line += f"; details in {job_dir / 'train.log'}"
    _say(job_dir, line, f"{e.msg}\n")
    return JobFailed(line, 1)


def _stopped(signum: int, job_dir: Path, started: float) -> JobFailed:
    """The launcher was asked to stop (SIGTERM, Ctrl-C): exit 128 + signum, saying what was kept."""
    import json

    name = signal.Signals(signum).name
    marker = job_dir / "interrupted.json"  # written by rank 0 when the ranks stopped with a checkpoint
    if marker.is_file() and marker.stat().st_mtime >= started - 1:  # not one left by an earlier stop
        step = json.loads(marker.read_text()).get("step")
        line = (
            f"stopped by {name}: the ranks saved a checkpoint at step {step} ({marker}); "
            "run the same command again to resume"
        )
    else:
        line = f"stopped by {name}: every rank has exited; a rerun resumes from the newest checkpoint, if any"
    _say(job_dir, line)
    return JobFailed(line, 128 + signum)
