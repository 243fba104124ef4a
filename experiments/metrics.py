"""Per-rank TensorBoard scalars and rank 0's metrics.json."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from experiments.log import file_logger

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
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)

    def step(self, step: int, loss: float, scalars: dict[str, float], log, measured: bool = False) -> None:
        self.losses.append(loss)
        if not measured and step > 1:  # step 1 pays for warm-up and lazy init
            self.step_times.append(scalars["perf/step_time_s"])
        self.writer.add_scalar("loss/train", loss, step)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
            if step > 1:
                self.sums[tag] = self.sums.get(tag, 0.0) + value
                self.counts[tag] = self.counts.get(tag, 0) + 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
            log = file_logger()
        if self.rank == 0 and (step % self.log_every == 0 or step == 1 or step == self.total):
            log.info(
                "step %d/%d loss %.5f step_time %.4fs samples/s %.1f",
                step,
                self.total,
                loss,
                scalars["perf/step_time_s"],
                scalars["perf/samples_per_s"],
            )

    def steady_step_time(self) -> float:
        """Median time of the clean steps (not the first, not the instrumented ones)."""
        return statistics.median(self.step_times) if self.step_times else float("nan")

    def means(self) -> dict[str, float]:
        return {tag: self.sums[tag] / self.counts[tag] for tag in self.sums}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


# Overlay the same metric across every job of a sweep (TensorBoard's Custom Scalars tab).
LAYOUT = {
    "paralab": {
        "loss": ["Multiline", ["loss/train"]],
        "throughput": ["Multiline", ["perf/samples_per_s", "perf/tokens_per_s"]],
        "step time": ["Multiline", ["perf/step_time_s", "perf/data_time_s"]],
        "model-state memory, measured vs theory": [
            "Multiline",
            ["mem/model_state_bytes", "theory/mem/model_state_bytes"],
        ],
        "communication sent per step, measured vs theory": [
            "Multiline",
            [r"comm/\w+_wire_bytes", r"theory/comm/\w+_wire_bytes"],
        ],
        "pipeline bubble": ["Multiline", ["pipeline/bubble_fraction", "theory/pipeline/bubble_fraction"]],
    }
}


def write_hparams(job_dir: Path, metrics: dict[str, Any]) -> None:
    """One HParams entry per job (its own run dir, so no second writer shares a rank's folder)."""
    hparams = {
        "strategy": metrics["strategy"],
        "world_size": metrics["world_size"],
        **{f"degree/{k}": v for k, v in metrics["degrees"].items()},
        "model": metrics["model"],
        "global_batch_size": metrics["global_batch_size"],
        "precision": metrics["precision"],
    }
    peaks = [r.get("mem/peak_rss_bytes", r.get("mem/cuda_peak_allocated_bytes", 0)) for r in metrics["ranks"]]
    results = {
        "hparam/samples_per_s": metrics["samples_per_s"],
        "hparam/final_loss": metrics["final_loss"],
        "hparam/peak_memory_bytes": float(max(peaks, default=0)),
    }
    with SummaryWriter(str(job_dir / "tb" / "hparams")) as w:
        w.add_hparams(hparams, results, run_name=".")
        w.add_custom_scalars(LAYOUT)


def write_metrics(job_dir: Path, metrics: dict[str, Any]) -> None:
    tmp = job_dir / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(job_dir / METRICS_FILE)


def read_metrics(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / METRICS_FILE).read_text())
