"""Per-rank TensorBoard scalars, the HParams entry and the Custom Scalars layout."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from experiments.log import file_logger
from experiments.record import RunRecord, Tag


def tb_dir(job_dir: Path, rank: int) -> Path:
    # One writer per directory: two writers in one folder confuse TensorBoard.
    return job_dir / "tb" / f"rank{rank}"


class TensorBoardSink:
    """One rank's TensorBoard writer, plus rank 0's progress bar and step lines in train.log.

    Building each scalar's protobuf costs tens of microseconds of Python, and a worker thread still
    holds the GIL while it builds them, so the worker writes one event per step holding every tag
    of that step (what add_scalar writes, one tag per event, costs about 3x as much per step).
    """

    def __init__(self, job_dir: Path, rank: int, total_steps: int, purge_step: int | None = None) -> None:
        self.rank, self.total = rank, total_steps
        self.writer = SummaryWriter(str(tb_dir(job_dir, rank)), purge_step=purge_step)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paralab-tb")
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=(purge_step or 1) - 1, desc="train", dynamic_ncols=True
            )
        self.shown = (purge_step or 1) - 1

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.pool.submit(self._write, step, dict(values))

    def series(self, first_step: int, values: dict[str, list[float]]) -> None:
        """Per-step values of a log interval, each at its own step number."""
        self.pool.submit(self._write_series, first_step, values)

    def _write(self, step: int, values: dict[str, float]) -> None:
        summary = Summary(value=[Summary.Value(tag=t, simple_value=float(v)) for t, v in values.items()])
        self.writer.file_writer.add_summary(summary, step)

    def _write_series(self, first_step: int, values: dict[str, list[float]]) -> None:
        for i in range(len(next(iter(values.values())))):
            self._write(first_step + i, {tag: series[i] for tag, series in values.items()})

    def log_step(self, step: int, total: int, loss: float, perf: dict[str, float], log) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.update(step - self.shown)
            self.bar.set_postfix(loss=f"{loss:.4f}")
            log = file_logger()  # the bar owns the terminal; train.log keeps the step lines
        self.shown = step
        timing = ""
        if Tag.STEP_TIME in perf:
            timing = f" step_time {perf[Tag.STEP_TIME]:.4f}s samples/s {perf[Tag.SAMPLES]:.1f}"
        log.info("step %d/%d loss %.5f%s", step, total, loss, timing)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.pool.shutdown(wait=True)  # every queued scalar is written before the file closes
        self.writer.close()


# Overlay the same metric across every job of a sweep (TensorBoard's Custom Scalars tab).
LAYOUT = {
    "paralab": {
        "loss": ["Multiline", [Tag.LOSS]],
        "held-out loss, accuracy, perplexity": ["Multiline", [Tag.VAL_LOSS, Tag.VAL_ACC, Tag.VAL_PPL]],
        "throughput": ["Multiline", [Tag.SAMPLES, Tag.TOKENS]],
        "step time": ["Multiline", [Tag.STEP_TIME, Tag.DATA_TIME]],
        "model-state memory, measured vs theory": [
            "Multiline",
            [Tag.MODEL_STATE_BYTES, Tag.THEORY_MODEL_STATE],
        ],
        "communication sent per step, measured vs theory": [
            "Multiline",
            [Tag.comm(r"\w+", "wire_bytes"), Tag.theory_comm(r"\w+", "wire_bytes")],
        ],
        "pipeline bubble": ["Multiline", [Tag.BUBBLE, Tag.THEORY_BUBBLE]],
    }
}


def write_hparams(job_dir: Path, record: RunRecord) -> None:
    """One HParams entry per job (its own run dir, so no second writer shares a rank's folder)."""
    hparams = {
        "strategy": record.strategy,
        "world_size": record.world_size,
        **{f"degree/{k}": v for k, v in record.degrees.items()},
        "model": record.model,
        "global_batch_size": record.global_batch_size,
        "precision": record.precision,
    }
    results = {
        "hparam/samples_per_s": record.samples_per_s,
        "hparam/final_loss": record.final_loss,
        "hparam/peak_memory_bytes": record.peak_memory_bytes(),
    }
    for key in ("val_loss", "val_acc", "val_ppl"):
        if getattr(record, key) is not None:
            results[f"hparam/{key}"] = getattr(record, key)
    with SummaryWriter(str(job_dir / "tb" / "hparams")) as w:
        w.add_hparams(hparams, results, run_name=".")
        w.add_custom_scalars(LAYOUT)
