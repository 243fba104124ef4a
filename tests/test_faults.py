"""Durable runs: a stuck rank is an error, no rank outlives its launcher, Ctrl-C and SIGTERM stop
every rank, and a failed job says in one line which rank died first and how.

Each test starts a real `python train.py` (a new session, so the test can signal its whole process
group), waits until the ranks train, does something bad to one process from outside, and always
kills whatever is left in `finally`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.config import ConfigError
from experiments.parity import compose_config
from experiments.validate import validate
from tests.helpers import REPO, TINY, child_env

# Far more steps than any test waits for: the job only ends when a test makes it.
FOREVER = [*TINY, "train.steps=1000000", "train.log_every=50", "train.measure_every=0"]


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None
):
    """Poll `condition` until it is truthy; fail after `timeout` s (or when `proc` exits first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"train.py exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout} s")


def children() -> dict[int, int]:
    """pid -> ppid of every process on the machine, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    table[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    return table


def descendants(pid: int) -> set[int]:
    table, found, todo = children(), set(), [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running, or stopped; not a zombie and not gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rank_pid(job: Path, rank: int) -> int | None:
    # TensorBoard names each rank's event file events.out.tfevents.<time>.<host>.<pid>.<n>.
    files = glob.glob(str(job / "tb" / f"rank{rank}" / "events.out.tfevents.*"))
    return int(files[0].split(".")[-2]) if files else None


class Job:
    def __init__(self, proc: subprocess.Popen, job: Path):
        self.proc, self.dir = proc, job
        self.seen: set[int] = set()  # every descendant ever seen, for the cleanup

    def descendants(self) -> set[int]:
        found = descendants(self.proc.pid)
        self.seen |= found
        return found

    def ranks(self, world: int = 2) -> dict[int, int]:
        """rank -> pid, once every rank is training (a step line in train.log)."""
        log = self.dir / "train.log"

        def training():
            if not (log.is_file() and " INFO step " in log.read_text()):
                return None
            pids = {r: rank_pid(self.dir, r) for r in range(world)}
            return pids if all(pids.values()) and set(pids.values()) <= self.descendants() else None

        return wait_for(training, 120, "training ranks", self.proc)

    def finish(self, timeout: float) -> tuple[int, str, float]:
        """Wait for train.py to exit: (exit code, stderr, seconds it took)."""
        t0 = time.monotonic()
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"train.py still running {timeout} s later")
        return self.proc.returncode, err, time.monotonic() - t0


@contextlib.contextmanager
def job(tmp_path: Path, *overrides: str) -> Iterator[Job]:
    path = tmp_path / "job"
    cmd = [sys.executable, str(REPO / "train.py"), *FOREVER, *overrides, f"hydra.run.dir={path}"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    j = Job(proc, path)
    try:
        yield j
    finally:
        for pid in j.seen | descendants(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)


def last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def assert_all_gone(pids: set[int], within: float) -> None:
    wait_for(lambda: not any(alive(p) for p in pids), within, "exit of every rank")


@pytest.mark.parametrize("override", ["launcher.timeout_s=0", "launcher.grace_s=-1"])
def test_timeout_and_grace_are_range_checked(override):
    cfg = OmegaConf.to_object(compose_config([override]))
    with pytest.raises(ConfigError, match=override.split(".")[1]):
        validate(cfg)  # type: ignore[arg-type]


@pytest.mark.full
def test_a_stuck_rank_fails_the_job_within_the_timeout_naming_rank_and_collective(tmp_path):
    with job(tmp_path, "launcher=torchrun", "launcher.timeout_s=10", "launcher.grace_s=3") as j:
        pids = j.ranks()
        os.kill(pids[1], signal.SIGSTOP)  # alive, holding its sockets, answering nothing
        code, err, took = j.finish(timeout=60)
        assert code != 0
        line = last_line(err)
        assert line.startswith("paralab: rank 0 failed"), err[-3000:]
        assert "all_reduce" in line and "timed out after 10 s" in line and "launcher.timeout_s=10" in line
        assert "Traceback" not in err
        assert took < 60
        assert_all_gone(set(pids.values()), within=10)


@pytest.mark.parametrize("launcher", ["torchrun", "spawn"])
def test_no_rank_outlives_a_killed_launcher(tmp_path, launcher):
    with job(tmp_path, f"launcher={launcher}") as j:
        j.ranks()
        everyone = j.descendants()  # ranks, fork server, resource tracker
        os.kill(j.proc.pid, signal.SIGKILL)
        j.proc.wait()
        assert_all_gone(everyone, within=10)


@pytest.mark.parametrize("launcher", ["torchrun", "spawn"])
def test_ctrl_c_stops_every_rank_with_one_line(tmp_path, launcher):
    with job(tmp_path, f"launcher={launcher}") as j:
        j.ranks()
        everyone = j.descendants()
        os.killpg(j.proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        code, err, _ = j.finish(timeout=30)
        assert code == 128 + signal.SIGINT
        assert last_line(err).startswith("paralab: stopped by SIGINT"), err[-3000:]
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
        assert_all_gone(everyone, within=10)


def test_a_killed_rank_is_named_with_its_signal(tmp_path):
    with job(tmp_path, "launcher=torchrun", "launcher.max_restarts=0") as j:
        pids = j.ranks()
        os.kill(pids[1], signal.SIGKILL)
        code, err, _ = j.finish(timeout=60)
        assert code != 0
        line = last_line(err)
        assert line.startswith("paralab: rank 1 died (SIGKILL)"), err[-3000:]
        assert "Traceback" not in err and "ChildFailedError" not in err
        # torch's own summary is kept, in the log file.
        assert re.search(r"exitcode\s*:\s*-9", (j.dir / "train.log").read_text())
        assert_all_gone(set(pids.values()), within=10)


def test_sigterm_to_the_launcher_stops_ranks_with_a_checkpoint(tmp_path):
    with job(tmp_path, "launcher=torchrun") as j:
        pids = j.ranks()
        os.kill(j.proc.pid, signal.SIGTERM)  # scancel, preemption: the agent alone
        code, err, _ = j.finish(timeout=60)
        assert code == 128 + signal.SIGTERM
        expected = "paralab: stopped by SIGTERM: the ranks saved a checkpoint"
        assert last_line(err).startswith(expected), err[-3000:]
        assert (j.dir / "interrupted.json").is_file()
        assert_all_gone(set(pids.values()), within=10)


def test_the_summary_blames_the_rank_that_died_first(tmp_path):
    """torch lists failures in no useful order; the line names the earliest, with its signal."""
    import json as _json

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from parallel.launch import JobFailed, _child_failed

    error_file = tmp_path / "error.json"
    message = (
        "RankFailure: rank 0: lost its connection to a peer rank in all_reduce #7; another rank died first"
    )
    error_file.write_text(
        _json.dumps({"message": {"message": message, "extraInfo": {"py_callstack": "", "timestamp": "1000"}}})
    )
    consequence = ProcessFailure(local_rank=0, pid=11, exitcode=1, error_file=str(error_file))
    killed = ProcessFailure(local_rank=1, pid=12, exitcode=-9, error_file=str(tmp_path / "none.json"))
    killed.timestamp = 999
    failed = _child_failed(ChildFailedError("main", {0: consequence, 1: killed}), tmp_path)
    assert isinstance(failed, JobFailed) and failed.code == 1
    assert failed.message.startswith("rank 1 died (SIGKILL) at "), failed.message
    assert "then rank 0" in failed.message
    assert "\n" not in failed.message
    # The rank's own explanation is the reason when it failed first, minus the repeated rank.
    consequence.timestamp = 998
    failed = _child_failed(ChildFailedError("main", {0: consequence, 1: killed}), tmp_path)
    assert failed.message.startswith("rank 0 failed (exit code 1) at ")
    assert ": lost its connection to a peer rank in all_reduce #7;" in failed.message
    assert "main FAILED" in (tmp_path / "train.log").read_text()  # torch's own summary, kept in the log


def test_communication_failures_are_told_apart_from_other_errors():
    from experiments.worker import describe_failure

    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv")
    message, peer_lost = describe_failure(timeout, 0, 10, joined=False)  # type: ignore[misc]
    assert message.startswith("rank 0: init_process_group") and "timed out after 10 s" in message
    assert not peer_lost
    reset = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")
    message, peer_lost = describe_failure(reset, 1, 10)  # type: ignore[misc]
    assert message.startswith("rank 1: lost its connection to a peer rank") and peer_lost
    assert describe_failure(RuntimeError("DataLoader worker timed out"), 0, 10) is None
    assert describe_failure(ValueError("gloo timeout"), 0, 10) is None
