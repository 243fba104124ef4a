"""A real `python train.py` for tests that do something to its processes from outside: start it,
find its ranks, wait on what it writes, and leave nothing running whatever the test did."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env


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


def parents() -> dict[int, int]:
    """pid -> ppid of every process on the machine, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    table[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    return table


def children(pid: int) -> set[int]:
    return {child for child, ppid in parents().items() if ppid == pid}


def descendants(pid: int) -> set[int]:
    table, found, todo = parents(), set(), [pid]
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
def running(path: Path, args: list[str]) -> Iterator[Job]:
    """`python train.py ARGS hydra.run.dir=PATH`, in a session of its own; whatever is left of it is
    killed on the way out."""
    cmd = [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={path}"]
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
