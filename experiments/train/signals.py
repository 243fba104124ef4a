"""SIGTERM (preemption, scancel) asks a run to stop at its next log step with a checkpoint; so
does SIGUSR2, SLURM's warning before a time limit (and submitit's preemption signal), which SLURM
sends to every task of the job.

The handler only records the request: ranks must stop at the same step, so the request rides the
log step's one all-reduce, and every rank saves and leaves together.
"""

from __future__ import annotations

import signal

_requested: list[str] = []


def install() -> None:
    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGUSR2, _handle)


def _handle(signum: int, frame: object) -> None:
    _requested.append(signal.Signals(signum).name)


def requested() -> str | None:
    return _requested[0] if _requested else None
