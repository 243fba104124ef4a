"""Per-rank TensorBoard scalars and rank 0's metrics.json."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.json"


def tb_dir(job_dir: Path, rank: int) -> Path:
    # One writer per directory: two writers in one folder confuse TensorBoard.
    return job_dir / "tb" / f"rank{rank}"


class Recorder:
    """Collects one rank's step metrics; rank 0 also keeps the loss trajectory for metrics.json."""

    def __init__(self, job_dir: Path, rank: int, total_steps: int, log_every: int) -> None:
        self.job_dir, self.rank, self.total, self.log_every = job_dir, rank, total_steps, log_every
        self.writer = SummaryWriter(str(tb_dir(job_dir, rank)))
        self.losses: list[float] = []
        self.step_times: list[float] = []
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)

    def step(self, step: int, loss: float, scalars: dict[str, float], log) -> None:
        self.losses.append(loss)
        self.step_times.append(scalars["perf/step_time_s"])
        self.writer.add_scalar("loss/train", loss, step)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.rank == 0 and (step % self.log_every == 0 or step == 1 or step == self.total):
            log.info(
                "step %d/%d loss %.5f step_time %.4fs samples/s %.1f",
                step,
                self.total,
                loss,
                scalars["perf/step_time_s"],
                scalars["perf/samples_per_s"],
            )

    def steady_step_time(self) -> float:
        # The first step pays for allocator warm-up and lazy init; leave it out when we can.
        times = self.step_times[1:] or self.step_times
        return statistics.median(times)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


def write_metrics(job_dir: Path, metrics: dict[str, Any]) -> None:
    tmp = job_dir / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(job_dir / METRICS_FILE)


def read_metrics(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / METRICS_FILE).read_text())
