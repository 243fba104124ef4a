"""train.profile: torch.profiler over chosen steps of every rank, a Chrome trace per rank, and the
step's time split read from it (experiments/measure/timeline.py). train.memory_snapshot: torch's
CUDA memory snapshot of the sampled steps. Both cost only the steps they cover."""

from __future__ import annotations

import gzip
import json
import os
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from experiments.config.schema import TrainConfig
from experiments.measure import flight
from experiments.measure.timeline import split

TRACES = "traces"
SNAPSHOTS = "memory"


def trace_path(job_dir: Path, rank: int) -> Path:
    # *.pt.trace.json.gz: the name TensorBoard's profile plugin and Perfetto both read.
    return job_dir / TRACES / f"rank{rank}.pt.trace.json.gz"


class StepProfiler:
    def __init__(
        self, t: TrainConfig, job_dir: Path, rank: int, device: torch.device, bubble_axis: str | None
    ):
        self.on, self.first, self.last = t.profile, t.profile_from, t.profile_from + t.profile_steps - 1
        # Kineto's own lines (its start and stop, a CPU-only machine's missing GPU) stay off the
        # terminal; read before its first use.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        self.job_dir, self.rank, self.device, self.bubble_axis = job_dir, rank, device, bubble_axis
        self.prof: torch.profiler.profile | None = None
        self.mark: AbstractContextManager | None = None

    def covers(self, step: int) -> bool:
        return self.on and self.first <= step <= self.last

    def begin(self, step: int) -> None:
        if not self.covers(step):
            return
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
        # The step's bounds, for the split (a profile without a schedule marks none itself).
        self.mark = torch.profiler.record_function(f"ProfilerStep#{step}")
        self.mark.__enter__()

    def end(self, step: int) -> dict[str, float] | None:
        """After a profiled step; on the last one, the trace is written and the split returned."""
        if not self.covers(step) or self.prof is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        assert self.mark is not None
        self.mark.__exit__(None, None, None)
        if step != self.last:
            return None
        self.prof.__exit__(None, None, None)
        path = trace_path(self.job_dir, self.rank)
        path.parent.mkdir(exist_ok=True)
        self.prof.export_chrome_trace(str(path))
        self.prof = None
        with gzip.open(path, "rt") as f:
            trace = json.load(f)
        result = split(trace, flight.recorded(), self.bubble_axis)
        return None if result is None else result.scalars()


def snapshot_on(on: bool) -> None:
    """Record CUDA allocations (with stacks) for a snapshot, or stop recording."""
    torch.cuda.memory._record_memory_history(enabled="all" if on else None)


def write_snapshot(job_dir: Path, rank: int, step: int) -> Path:
    path = job_dir / SNAPSHOTS / f"rank{rank}_step{step}.pickle"
    path.parent.mkdir(exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    return path
