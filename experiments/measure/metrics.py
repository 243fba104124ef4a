"""Per-rank TensorBoard scalars, the HParams entry and the Custom Scalars layout."""

from __future__ import annotations

import sys
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from torch.utils.tensorboard import SummaryWriter

from experiments.measure.log import file_logger
from experiments.measure.record import RunRecord, Tag

QUEUE_EVENTS = 1024


def tb_dir(job_dir: Path, rank: int) -> Path:
    # One writer per directory: two writers in one folder confuse TensorBoard.
    return job_dir / "tb" / f"rank{rank}"


class TensorBoardSink:
    """One rank's TensorBoard writer, plus rank 0's progress bar and step lines in train.log.

    Events are built on the training thread, at log steps only, one event per step holding every
    tag of that step (add_scalar's one tag per event costs about 3x as much). A thread of our own
    would not take the work off the step: it needs the GIL to build protobufs, and each time a
    torch op released the GIL it took it and held it for up to a switch interval, which cost the
    training steps more than the writes themselves (measured: ~3 ms per log interval, 2 ranks).
    """

    def __init__(self, job_dir: Path, rank: int, total_steps: int, purge_step: int | None = None) -> None:
        self.rank, self.total, self.job_dir = rank, total_steps, job_dir
        # A log step queues one event per step of its interval, and more on sampled steps. With
        # torch's default queue of 10, the 11th waited for TensorBoard's thread to checksum the
        # others in pure Python: ~0.45 ms per log step on 2 ranks. Long enough, the queue never blocks.
        self.writer = SummaryWriter(str(tb_dir(job_dir, rank)), max_queue=QUEUE_EVENTS, purge_step=purge_step)
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=(purge_step or 1) - 1, desc="train", dynamic_ncols=True
            )
        self.shown = (purge_step or 1) - 1

    def scalars(self, step: int, values: dict[str, float]) -> None:
        # The event is built whole here: add_summary would build a Summary and then copy it.
        event = Event()
        for tag, value in values.items():
            event.summary.value.add(tag=tag, simple_value=float(value))
        self.writer.file_writer.add_event(event, step)

    def series(self, first_step: int, values: dict[str, list[float]], last: dict[str, float]) -> None:
        """Per-step values of a log interval, each at its own step number; `last` joins the last
        step's event (one event fewer for TensorBoard's writer thread to checksum)."""
        n = len(next(iter(values.values())))
        for i in range(n):
            at_step = {tag: series[i] for tag, series in values.items()}
            self.scalars(first_step + i, at_step if i < n - 1 else {**at_step, **last})

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
        self.writer.close()  # flushes every queued event


# Overlay the same metric across every job of a sweep (TensorBoard's Custom Scalars tab).
LAYOUT = {
    "paralab": {
        "loss": ["Multiline", [Tag.LOSS, Tag.AUX_LOSS]],
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
        "ac": record.ac if record.ac_every == 1 else f"{record.ac}/{record.ac_every}",
        "compile": record.compile,
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
