"""Durable runs: a stuck rank is an error, no rank outlives its launcher, Ctrl-C and SIGTERM stop
every rank, and a failed job says in one line which rank died first and how.

Each test starts a real `python train.py` (a new session, so the test can signal its whole process
group), waits until the ranks train, does something bad to one process from outside, and always
kills whatever is left in `finally`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from experiments.config.schema import ConfigError, typed_config
from experiments.report.parity import compose_config
from experiments.run.validate import validate
from tests.helpers import TINY
from tests.procs import Job, assert_all_gone, last_line, running

# Far more steps than any test waits for: the job only ends when a test makes it.
FOREVER = [*TINY, "train.steps=1000000", "train.log_every=50", "train.measure_every=0"]


@contextlib.contextmanager
def job(tmp_path: Path, *overrides: str) -> Iterator[Job]:
    """A job that trains until the test ends it."""
    with running(tmp_path / "job", [*FOREVER, *overrides]) as j:
        yield j


@pytest.mark.parametrize("override", ["launcher.timeout_s=0", "launcher.grace_s=-1"])
def test_timeout_and_grace_are_range_checked(override):
    cfg = typed_config(compose_config([override]))
    with pytest.raises(ConfigError, match=override.split(".")[1]):
        validate(cfg)  # type: ignore[arg-type]


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("spawn", marks=pytest.mark.full)])
def test_a_stopped_rank_is_named_and_the_job_ends_within_the_timeout(tmp_path, launcher):
    """Rank 1 stopped: the others time out in their collective, say where they wait, name rank 1,
    and end it, without waiting launcher.grace_s (60 s here) for a rank that cannot answer."""
    timeout = 6
    with job(tmp_path, f"launcher={launcher}", f"launcher.timeout_s={timeout}", "launcher.grace_s=60") as j:
        pids = j.ranks()
        os.kill(pids[1], signal.SIGSTOP)  # alive, holding its sockets, answering nothing
        code, err, took = j.finish(timeout=90)
        assert code != 0
        line = last_line(err)
        assert f"timed out after {timeout} s" in line and f"launcher.timeout_s={timeout}" in line, err[-3000:]
        assert re.search(r"rank 1 entered no collective", line), line
        assert re.search(r"rank 0 waits in all_reduce #\d+ on world \(step \d+\)", line), line
        assert "Traceback" not in err
        # The timeout, up to timeout / 2 more for the others' reports, and the launcher's exit.
        assert took < timeout + 12, took
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

    from experiments.run.launch import JobFailed, _child_failed

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
    from experiments.run.worker import describe_failure

    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv")
    message, peer_lost = describe_failure(timeout, 0, 10, joined=False)  # type: ignore[misc]
    assert message.startswith("rank 0: init_process_group") and "timed out after 10 s" in message
    assert not peer_lost
    reset = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")
    message, peer_lost = describe_failure(reset, 1, 10)  # type: ignore[misc]
    assert message.startswith("rank 1: lost its connection to a peer rank") and peer_lost
    assert describe_failure(RuntimeError("DataLoader worker timed out"), 0, 10) is None
    assert describe_failure(ValueError("gloo timeout"), 0, 10) is None


def test_a_hang_names_the_odd_rank_and_where_the_others_wait(tmp_path):
    """The diagnosis from the ranks' reports (experiments/measure/flight.py), as each case reads."""
    import json

    from experiments.measure.flight import HANG_DIR, diagnose

    def reports(**by_rank):
        d = tmp_path / HANG_DIR
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        for rank, (op, axis, seq) in by_rank.items():
            r = {
                "rank": int(rank[1:]),
                "step": 41,
                "collective": {"op": op, "axis": axis, "seq": seq, "group": "1"},
            }
            (d / f"rank{rank[1:]}.json").write_text(json.dumps(r))

    # Every rank waits, one elsewhere: it is the odd one.
    rs = ("reduce_scatter", "dp_shard", 12)
    reports(r0=rs, r1=rs, r2=rs, r3=("all_gather", "tp", 7))
    assert diagnose(tmp_path, 4, wait_s=0) == (
        "rank 3 is in all_gather #7 on tp (step 41); ranks 0-2 wait in reduce_scatter #12 on dp_shard (step 41)"
    )
    # One rank reports nothing: stopped, dead or computing.
    reports(r0=rs, r2=rs, r3=rs)
    line = diagnose(tmp_path, 4, wait_s=0)
    assert line.startswith("rank 1 entered no collective") and line.endswith(
        "ranks 0, 2, 3 wait in reduce_scatter #12 on dp_shard (step 41)"
    ), line
