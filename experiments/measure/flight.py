"""What each rank was doing when the job hung: the collective it entered last, on which mesh axis,
at which step; and the one line that names the odd rank.

torch's flight recorder (c10d's, for gloo as for NCCL: TORCH_FR_BUFFER_SIZE) keeps every
collective a rank enters in a ring buffer in C++, at no cost to the loop in Python. When a
collective times out (launcher.timeout_s), each rank that waited writes its last entry to
`<job dir>/hang/rank<r>.json`; the ranks that wrote nothing are the stuck ones: stopped, dead, or
busy outside the collectives. Every rank writes its pid there at start, so that the first rank
to diagnose can end the stuck ones at once instead of the job waiting launcher.grace_s for them.
On one node; across nodes each node's job dir sees its own ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from parallel.mesh import axis_of

# Entries the recorder keeps per rank: the last collectives are the ones a diagnosis reads.
FR_ENTRIES = 256
HANG_DIR = "hang"

_step = 0


def enable() -> None:
    """Before init_process_group: torch's flight recorder on, unless the user set its size."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(FR_ENTRIES))


def note_step(step: int) -> None:
    """The step this rank is in (set by the Meter before each step: one Python assignment)."""
    global _step
    _step = step


def clear(job_dir: Path) -> None:
    """At a job's start: reports of an earlier run of this job dir are not this run's."""
    shutil.rmtree(job_dir / HANG_DIR, ignore_errors=True)


def register(job_dir: Path, rank: int) -> None:
    """At a rank's start: its pid, and no report of an earlier attempt (a restarted group)."""
    d = job_dir / HANG_DIR
    d.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):
        (d / f"rank{rank}.json").unlink()
    (d / f"pid{rank}").write_text(f"{socket.gethostname()} {os.getpid()}")


def recorded() -> list[dict]:
    """This rank's flight recorder entries, oldest first ([] when off)."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        entries = json.loads(_dump_fr_trace_json(True, False)).get("entries", [])
    except Exception:  # noqa: BLE001 - no recorder, no entries
        return []
    return sorted(entries, key=lambda e: e.get("record_id", 0))


def last_collective() -> dict | None:
    """The newest entry of this rank's flight recorder: op, process group, mesh axis, sequence number."""
    entries = recorded()
    if not entries:
        return None
    e = entries[-1]
    group = (e.get("process_group") or ["", ""])[0]
    seq = e.get("p2p_seq_id") if e.get("is_p2p") else e.get("collective_seq_id")
    return {
        "op": str(e.get("profiling_name", "a collective")).split(":", 1)[-1],
        "group": group,
        "axis": axis_of(str(group)),
        "seq": seq,
    }


def report(job_dir: Path, rank: int) -> None:
    """This rank timed out waiting: what it waits in, for the others to read."""
    d = job_dir / HANG_DIR
    d.mkdir(exist_ok=True)
    entry = {"rank": rank, "step": _step, "collective": last_collective()}
    tmp = d / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(entry))
    tmp.replace(d / f"rank{rank}.json")


def _reports(job_dir: Path) -> dict[int, dict]:
    out = {}
    for f in (job_dir / HANG_DIR).glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            r = json.loads(f.read_text())
            out[int(r["rank"])] = r
    return out


def _ranks(rs: list[int]) -> str:
    """'rank 3' or 'ranks 0-2' or 'ranks 0, 2, 5'."""
    if len(rs) == 1:
        return f"rank {rs[0]}"
    if rs == list(range(rs[0], rs[-1] + 1)):
        return f"ranks {rs[0]}-{rs[-1]}"
    return "ranks " + ", ".join(map(str, rs))


def describe(c: dict | None, unknown: str = "an unknown collective") -> str:
    """A last_collective() entry as the one-line messages name it: `all_reduce #12 on dp_shard`."""
    return unknown if c is None else f"{c['op']} #{c['seq']} on {c['axis']}"


def _where(r: dict) -> str:
    return f"{describe(r.get('collective'))} (step {r['step']})"


def diagnose(job_dir: Path, world: int, wait_s: float) -> str:
    """The one line: which rank is odd, and where the others wait. Waits up to `wait_s` for the
    other ranks' reports (they time out at about the same time)."""
    end = time.monotonic() + wait_s
    reports = _reports(job_dir)
    while len(reports) < world and time.monotonic() < end:
        time.sleep(0.2)
        reports = _reports(job_dir)
    silent = sorted(set(range(world)) - set(reports))
    groups: dict[str, list[int]] = {}
    for rank, r in sorted(reports.items()):
        groups.setdefault(_where(r), []).append(rank)
    waits = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    parts = []
    if silent:
        parts.append(
            f"{_ranks(silent)} entered no collective within launcher.timeout_s (stopped, dead, or busy "
            "outside the collectives)"
        )
    else:  # every rank waits, in different places: the smaller groups are the odd ones
        parts += [f"{_ranks(rs)} {'is' if len(rs) == 1 else 'are'} in {where}" for where, rs in waits[1:]]
        waits = waits[:1]
    parts += [f"{_ranks(rs)} wait{'s' if len(rs) == 1 else ''} in {where}" for where, rs in waits]
    return "; ".join(parts)


DIAGNOSIS = "diagnosis.txt"


def diagnose_and_end(job_dir: Path, rank: int, world: int, timeout_s: float) -> str:
    """On a collective's timeout, in the rank that waited: report, read the others' reports,
    write the job's one line for the launcher, and end the stuck ranks. Returns the line."""
    report(job_dir, rank)
    line = f"a collective timed out after {timeout_s:g} s (launcher.timeout_s={timeout_s:g}): " + diagnose(
        job_dir, world, wait_s=min(10.0, timeout_s / 2)
    )
    tmp = job_dir / HANG_DIR / f".{DIAGNOSIS}.{rank}"
    with contextlib.suppress(OSError):
        tmp.write_text(line)
        if not (job_dir / HANG_DIR / DIAGNOSIS).exists():  # the first rank's line stands
            tmp.replace(job_dir / HANG_DIR / DIAGNOSIS)
    end_silent(job_dir, world)
    return line


def read_diagnosis(job_dir: Path) -> str | None:
    with contextlib.suppress(OSError):
        return (job_dir / HANG_DIR / DIAGNOSIS).read_text().strip() or None
    return None


def end_silent(job_dir: Path, world: int) -> None:
    """SIGKILL the ranks on this host that reported nothing: a stuck rank cannot save or stop on
    its own, and the job should not wait launcher.grace_s for it."""
    reports, host = _reports(job_dir), socket.gethostname()
    for rank in range(world):
        if rank in reports:
            continue
        with contextlib.suppress(OSError, ValueError):
            where, pid = (job_dir / HANG_DIR / f"pid{rank}").read_text().split()
            if where == host and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
