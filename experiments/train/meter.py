"""The Meter owns measurement, so that measuring does not change what is measured.

Between log steps the loop adds no host sync and no collective: each step's loss and gradient-norm
share stay on the device, in small buffers. On a log step the Meter starts one all-reduce of a
stacked vector of the buffered values and goes on; the next step's end reads the result and writes
it to TensorBoard at the values' own step numbers (one point per step). Nothing waits for that
collective but a step that must: one that checkpoints, the last, an evaluation, and a stop.
Throughput comes from the wall time of the clean steps in the interval; step 1 (warm-up, lazy
init) and sampled steps are timed apart. Sampled steps run under the comm counter and the memory
probes, which see every op and so cost time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from experiments.config.schema import TrainConfig
from experiments.measure import flight
from experiments.measure.activations import SavedActivations
from experiments.measure.counters import CommCounter, GatheredParams, peak_memory_bytes, reset_peak_memory
from experiments.measure.metrics import TensorBoardSink
from experiments.measure.profiling import StepProfiler, snapshot_on, write_snapshot
from experiments.measure.record import Tag
from experiments.train import signals
from experiments.train.evaluate import EvalResult
from experiments.train.state import TrainState
from experiments.train.step import StepResult
from parallel.distenv import RankEnv
from parallel.layout import layout, optimizer_state_bytes, storage_bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_check(env: RankEnv, device: torch.device) -> tuple[bool, str]:
    """Whether this node gives each rank a core (CPU) or a device (GPU) of its own."""
    if device.type == "cuda":
        have, what = torch.cuda.device_count(), "GPUs"
    else:
        have, what = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
            "cores",
        )
    if env.local_world_size <= have:
        return True, ""
    return False, (
        f"{env.local_world_size} ranks share {have} {what} on this node: throughput, scaling, step time "
        "and bubble measure the wait for cores, not the strategy"
    )


# The comm counter sees every op through Python, which costs a sampled FSDP step about one more
# step's time. A strategy issues the same collectives every step, so they are counted on the
# first sampled step and on every 5th after it; memory is probed on every sampled step.
COMM_EVERY_SAMPLES = 5


class TimedBatches:
    """Wraps the batch iterator: host seconds spent waiting for data (no device sync)."""

    def __init__(self, it: Iterator[tuple[Tensor, Tensor]]) -> None:
        self.it, self.seconds = it, 0.0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t0

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


@dataclass(frozen=True)
class Rates:
    """What the run's shape says about one step: for throughput and MFU."""

    global_batch: int
    local_batch: int
    tokens_per_sample: int  # 0 for classification
    flops_per_step: float  # counted op by op (experiments/measure/flops.py)
    peak_flops: float  # of one device, for the dtype the step computes in; 0 = unknown (no MFU)
    devices: int  # every GPU the job computes on (nn.DataParallel: all of its one process's)
    devices_per_rank: int = 1


class NonFiniteLoss(RuntimeError):
    pass


class InFlight:
    """A log step's values on their way to the host: the all-reduce started, not waited for.

    `summed` is all-reduced in place; `kept` rides along unreduced. The host reads both later, so a
    log step waits neither for the collective (a gloo all-reduce hands work between threads: ~0.6
    ms on a busy 2-core box) nor, on a GPU, for the device to drain.
    """

    def __init__(self, summed: Tensor, kept: Tensor, world_size: int) -> None:
        self.work = dist.all_reduce(summed, async_op=True) if world_size > 1 else None
        self.summed, self.kept = summed, kept
        self.ready: torch.cuda.Event | None = None
        if summed.is_cuda:
            if self.work is not None:
                self.work.wait()  # NCCL: the current stream waits for the collective, the host does not
            n = summed.numel()
            self.host = torch.empty(n + kept.numel(), dtype=summed.dtype, pin_memory=True)
            self.host[:n].copy_(summed, non_blocking=True)
            self.host[n:].copy_(kept, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def values(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()  # this copy only, not the steps queued after it
            return self.host.tolist()
        if self.work is not None:
            self.work.wait()
        return self.summed.tolist() + self.kept.tolist()


@dataclass
class Interval:
    """The steps of one log interval, between their log step and the step that reads their values."""

    step: int  # the log step
    first: int  # its first step
    slots: list[int]  # where each step's values sit in the vector
    lrs: list[float]
    perf: dict[str, float]
    values: InFlight


class Meter:
    def __init__(
        self,
        t: TrainConfig,
        env: RankEnv,
        device: torch.device,
        state: TrainState,
        batches: TimedBatches,
        sink: TensorBoardSink,
        theory: dict[str, float],
        rates: Rates,
        loss_holders: int,
        busy_seconds: Callable[[], Callable[[], float]] | None,
        log: logging.Logger,
        progress: dict[str, Any] | None = None,
        aux_terms: list[Tensor] | None = None,
        pipelined: bool = False,
        profiler: StepProfiler | None = None,
    ) -> None:
        self.t, self.env, self.device, self.state = t, env, device, state
        self.batches, self.sink, self.theory, self.rates = batches, sink, theory, rates
        self.loss_scale = 1.0 / loss_holders
        self.busy_seconds = busy_seconds
        self.log = log
        self.gathered = GatheredParams(state.model)
        self.saved = SavedActivations(state.model)
        self.pipelined = pipelined
        # train.profile's steps: traced, split, and left out of the throughput like sampled ones.
        self.profiler = profiler
        self.time_split: dict[str, float] = {}
        self.snapshots = t.memory_snapshot and device.type == "cuda"
        self._cuda_peak_fwd_bwd: int | None = None
        self.timing_meaningful, self.timing_note = timing_check(env, device)
        self.check_syncs = t.check_syncs and device.type == "cuda"
        self.zero = torch.zeros((), device=device)
        # Per-step values waiting for the next log step.
        self.loss_buf: list[Tensor] = []
        self.sq_buf: list[Tensor] = []
        self.sq_global: list[bool] = []
        self.lrs: list[float] = []
        # A model's auxiliary loss, per micro-step as the loss function leaves it; None: it has none.
        self.aux_terms = aux_terms
        self.aux_buf: list[Tensor] = []
        self.first_step = self.first_buffered = state.step + 1
        self.in_flight: Interval | None = None
        # The step after an evaluation may re-initialise what eval changed (a pipeline's stages
        # switch back to backward): timed apart like the first step.
        self.cold_step = 0
        self.window = min(t.log_every, t.steps)  # no interval is longer
        # The interval's clean steps: wall time, data time, pipeline compute time.
        self.clean_s = self.data_s = 0.0
        # Pipeline compute of the clean steps, read once the device has caught up (CUDA events).
        self.busy_pending: list[Callable[[], float]] = []
        self.clean_steps = 0
        self.mark: float | None = None
        self.interval_step_times: list[float] = []
        # The run's history so far: a resumed run continues the losses of the one it resumes.
        progress = progress or {}
        self.losses: list[float] = list(progress.get("losses", []))
        self.grad_norms: list[float] = list(progress.get("grad_norms", []))
        self.resumes: list[dict[str, int]] = list(progress.get("resumes", []))
        self.evals: list[dict[str, Any]] = list(progress.get("evals", []))
        self.eval_s = 0.0  # seconds spent evaluating, kept out of the training time
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if state.step or restart:
            self.resumes.append({"from_step": state.step, "restart": restart})
        self.last_sample: dict[str, float] = {}
        self.bubble_sum = 0.0
        self.bubble_n = 0
        self.wall0 = time.perf_counter()  # set again by start(), when the loop begins
        self.checkpoint_s = 0.0  # saves inside the loop: reported apart, not in the loop's wall time
        self.samples_taken = 0
        self.first_step_s = 0.0
        self.last_comm: dict[str, float] = {}
        self._counter: CommCounter | None = None
        self._grads_bytes = 0
        reset_peak_memory(device, rates.devices_per_rank)  # setup's unsharded model is not the run's
        self._engine_memory: dict[str, int] | None = None

    # ---- the schedule ----
    def sampled(self, step: int) -> bool:
        t = self.t
        if self.profiled(step):
            return False  # a profiled step shows the step as it runs, without the counters
        # Step 1 pays for lazy init, step 2 for DDP's bucket rebuild (a one-time broadcast): the
        # first sample is the first steady step.
        return t.measure_every > 0 and (step == min(3, t.steps) or step % t.measure_every == 0)

    def profiled(self, step: int) -> bool:
        return self.profiler is not None and self.profiler.covers(step)

    def logs(self, step: int) -> bool:
        t = self.t
        return step % t.log_every == 0 or step == t.steps or self.checkpoints(step)

    def checkpoints(self, step: int) -> bool:
        """Steps that end with a checkpoint (always the last); they are log steps too."""
        t = self.t
        return step == t.steps or (t.checkpoint_every > 0 and step % t.checkpoint_every == 0)

    def clean(self, step: int) -> bool:
        # The first step of a run (or of a resumed run) pays for lazy init and warm-up.
        return (
            step > self.first_step
            and step != self.cold_step
            and not self.sampled(step)
            and not self.profiled(step)
        )

    def start(self) -> None:
        """The loop's clock starts here, with every rank: the first step must not time another
        rank's setup (building the held-out set, say) as its own wait in the first collective."""
        if self.env.world_size > 1:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.wall0 = time.perf_counter()

    # ---- around each step ----
    def begin(self, step: int) -> Callable[[], None] | None:
        """Before the step; returns the probe to run between backward and the optimizer step."""
        self.lrs.append(self.state.scheduler.get_last_lr()[0])
        flight.note_step(step)
        if self.clean(step):
            if self.mark is None:
                self.mark = time.perf_counter()
            if self.check_syncs:
                torch.cuda.set_sync_debug_mode("error")
            return None
        self._pause()
        if self.profiled(step):
            self.profiler.begin(step)  # type: ignore[union-attr]
            return None
        if not self.sampled(step):
            return None
        if self.snapshots:
            snapshot_on(True)
        self.gathered.arm(True)
        # The allocator counts on the host, as ops are issued: no sync needed for a step's own peak.
        reset_peak_memory(self.device, self.rates.devices_per_rank)
        if step != self.cold_step or not self.pipelined:
            self.saved.arm(True)
        else:
            self.saved.clear()
        if step == self.cold_step and self.samples_taken % COMM_EVERY_SAMPLES == 0:
            # After an evaluation a pipeline re-initialises its stages for backward (shape
            # messages, and one more forward, whose activations are not counted either): not
            # the strategy's per-step traffic. The next sample counts instead.
            return self._probe_grads
        if self.samples_taken % COMM_EVERY_SAMPLES == 0:
            self._counter = CommCounter()
            self._counter.__enter__()
        self.samples_taken += 1
        return self._probe_grads

    def _probe_grads(self) -> None:
        self.saved.arm(False)
        if self.device.type == "cuda":
            self._cuda_peak_fwd_bwd = peak_memory_bytes(self.device, self.rates.devices_per_rank)[
                Tag.CUDA_PEAK
            ]
        engine = self.state.engine
        # An engine may keep gradients in its own buffers, which exist only now, before its step.
        self._engine_memory = engine.memory() if engine is not None else None
        if self._engine_memory is not None:
            self._grads_bytes = self._engine_memory["grads"]
        else:
            self._grads_bytes = storage_bytes(p.grad for p in self.state.model.parameters())

    def _pause(self) -> None:
        """End a stretch of clean steps: their time is known once the device has caught up."""
        if self.mark is not None:
            sync(self.device)
            self.clean_s += time.perf_counter() - self.mark
            self.mark = None

    def end(self, step: int, result: StepResult) -> bool:
        """After the step; True once the ranks agree that some rank was asked to stop."""
        if self.check_syncs:
            torch.cuda.set_sync_debug_mode("default")
        losses = result.losses
        if not losses:
            self.loss_buf.append(self.zero)
        elif len(losses) == 1 and losses[0].dtype == torch.float32:
            self.loss_buf.append(losses[0])  # no op on the common path; scaled once per flush
        else:
            self.loss_buf.append(torch.stack(losses).float().mean())
        self.sq_buf.append(result.grad_sq)
        self.sq_global.append(result.grad_sq_is_global)
        if self.aux_terms is not None:
            self.aux_buf.append(torch.stack(self.aux_terms).mean() if self.aux_terms else self.zero)
            self.aux_terms.clear()
        data_s = self.batches.take()
        busy = self.busy_seconds() if self.busy_seconds is not None else None
        if self.profiled(step):
            split = self.profiler.end(step)  # type: ignore[union-attr]
            if split:
                self.time_split = split
                self.sink.scalars(step, split)
        if self.clean(step):
            self.clean_steps += 1
            self.data_s += data_s
            if busy is not None:
                self.busy_pending.append(busy)
        elif self.sampled(step):
            self._finish_sample(step)
        else:
            sync(self.device)  # the first step: its warm-up stays out of the next clean stretch
            if step == self.first_step:
                self.first_step_s = time.perf_counter() - self.wall0
        # The last interval's values have had a whole step to arrive.
        stop = self._read()
        if self.logs(step) or stop:
            # A stop between log steps reduces this step's values too: the checkpoint holds them.
            self._pause()
            self._reduce(step)
            if stop or self.checkpoints(step):
                # Checkpoints hold only values read, and checked finite.
                stop = self._read() or stop
        return stop

    def _finish_sample(self, step: int) -> None:
        sync(self.device)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
        self.gathered.arm(False)
        if self.snapshots:
            path = write_snapshot(self.sink.job_dir, self.env.rank, step)
            snapshot_on(False)
            self.log.info("CUDA memory snapshot of step %d: %s (pytorch.org/memory_viz)", step, path)
        model, opt = self.state.model, self.state.optimizer
        if self._engine_memory is not None:
            params_bytes, optim_bytes = self._engine_memory["params"], self._engine_memory["optim"]
        else:
            params_bytes, optim_bytes = storage_bytes(model.parameters()), optimizer_state_bytes(opt)
        gathered = self.gathered.bytes
        memory = {
            Tag.PARAMS_BYTES: params_bytes,
            Tag.GATHERED_BYTES: gathered,
            Tag.GRADS_BYTES: self._grads_bytes,
            Tag.OPTIM_BYTES: optim_bytes,
            Tag.MODEL_STATE_BYTES: params_bytes + gathered + self._grads_bytes + optim_bytes,
            **peak_memory_bytes(self.device, self.rates.devices_per_rank),
            **self._activation_bytes(),
        }
        if self._counter is not None:
            self.last_comm = self._counter.scalars()
            self.sink.scalars(step, self.last_comm)
        self.last_sample = {**self.last_comm, **memory}
        self.sink.scalars(step, {**memory, **self.theory})
        self._counter = None

    def _activation_bytes(self) -> dict[str, float]:
        """Per micro-step: a micro-step's activations are freed by its backward, before the next."""
        per = 1.0 / self.t.grad_accum_steps
        if not self.saved.by_block:
            return {}  # not measured on this sample (a pipeline's step after an evaluation)
        out = {Tag.ACTIVATIONS: self.saved.total * per}
        out.update({Tag.activations(b): n * per for b, n in sorted(self.saved.by_block.items())})
        if self._cuda_peak_fwd_bwd is not None:
            out[Tag.CUDA_PEAK_FWD_BWD] = self._cuda_peak_fwd_bwd
        return out

    # ---- log steps ----
    def _reduce(self, step: int) -> None:
        """Start one collective for the whole interval: losses, grad-norm shares and the stop request."""
        # Each step has a fixed slot, by its step number: a ring all-reduce sums each position in
        # its own rank order, so a resumed run (whose first interval is shorter) must put step s
        # where the uninterrupted run put it to reduce it bit for bit the same.
        # Summed: losses, squared-norm shares, the stop flag, auxiliary losses (if any); then kept.
        w, n, summed = self.window, len(self.loss_buf), self._summed_size()
        slots = [(self.first_buffered + i - 1) % w for i in range(n)]
        vec = [self.zero] * (summed + w)
        for i, slot in enumerate(slots):
            vec[slot] = self.loss_buf[i]
            # Clipped steps already hold the global square: it rides along, outside the sum.
            vec[summed + slot if self.sq_global[i] else w + slot] = self.sq_buf[i]
            if self.aux_terms is not None:
                vec[2 * w + 1 + slot] = self.aux_buf[i]
        vec[2 * w] = torch.full((), float(signals.requested() is not None), device=self.device)
        values = InFlight(torch.stack(vec[:summed]), torch.stack(vec[summed:]), self.env.world_size)
        self.in_flight = Interval(step, self.first_buffered, slots, self.lrs, self._interval_perf(), values)
        self.loss_buf, self.sq_buf, self.sq_global, self.lrs, self.aux_buf = [], [], [], [], []
        self.first_buffered = step + 1
        self.clean_s = self.data_s = 0.0
        self.busy_pending = []
        self.clean_steps = 0

    def _read(self) -> bool:
        """The interval in flight, if any, reduced: logged, checked; True if some rank was asked to
        stop. Off the clean steps' clock: its logging is no more a step's cost than it was on the
        log step, where it used to run."""
        iv, self.in_flight = self.in_flight, None
        if iv is None:
            return False
        t0 = time.perf_counter()
        w, values, summed = self.window, iv.values.values(), self._summed_size()
        # Summed over the ranks that hold a loss, each counted once per copy: the mean.
        losses = [values[s] * self.loss_scale for s in iv.slots]
        norms = [(values[w + s] + values[summed + s]) ** 0.5 for s in iv.slots]
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):
                # Every rank holds the same reduced values, so every rank stops here, together.
                raise NonFiniteLoss(
                    f"loss is {loss} at step {iv.first + i}: training stopped; the last "
                    "good checkpoint is kept (lower train.lr, or set train.grad_clip)"
                )
        series = {Tag.LOSS: losses, Tag.GRAD_NORM: norms, Tag.LR: iv.lrs}
        if self.aux_terms is not None:  # a part of the loss above, shown on its own
            series[Tag.AUX_LOSS] = [values[2 * w + 1 + s] * self.loss_scale for s in iv.slots]
        self.sink.series(iv.first, series, iv.perf)
        self.losses += losses
        self.grad_norms += norms
        self.sink.log_step(iv.step, self.t.steps, losses[-1], iv.perf, self.log)
        if self.mark is not None:
            self.mark += time.perf_counter() - t0
        return values[2 * w] > 0

    def _summed_size(self) -> int:
        return 2 * self.window + 1 + (self.window if self.aux_terms is not None else 0)

    def _interval_perf(self) -> dict[str, float]:
        perf: dict[str, float] = {Tag.TIMING_MEANINGFUL: float(self.timing_meaningful)}
        if not self.clean_steps:
            return perf
        r = self.rates
        step_time = self.clean_s / self.clean_steps
        self.interval_step_times.append(step_time)
        perf.update(
            {
                Tag.STEP_TIME: step_time,
                Tag.DATA_TIME: self.data_s / self.clean_steps,
                Tag.SAMPLES: r.global_batch / step_time,
                Tag.RANK_SAMPLES: r.local_batch / step_time,
            }
        )
        if r.tokens_per_sample:
            perf[Tag.TOKENS] = r.global_batch * r.tokens_per_sample / step_time
            perf[Tag.RANK_TOKENS] = r.local_batch * r.tokens_per_sample / step_time
        if r.peak_flops:
            perf[Tag.MFU] = r.flops_per_step / step_time / r.devices / r.peak_flops
        if self.busy_seconds is not None:
            busy_s = sum(busy() for busy in self.busy_pending)  # after _pause's sync: events are done
            compute = self.clean_s - self.data_s
            # Not clamped: busy time beyond the step's compute would be a clock bug, and must show.
            bubble = 1.0 - busy_s / compute if compute > 0 else 0.0
            perf[Tag.PIPE_BUSY] = busy_s / self.clean_steps
            perf[Tag.BUBBLE] = bubble
            self.bubble_sum += bubble
            self.bubble_n += 1
        return perf

    # ---- evaluation ----
    def evaluate(self, step: int, run: Callable[[int, float], EvalResult]) -> bool:
        """Run an evaluation after `step`, outside the timed training steps and the wall time.

        The interval in flight is read first: a stop request or a non-finite loss must come before
        an evaluation, not after it. True: some rank was asked to stop, and nothing was evaluated.
        """
        self._pause()
        if self._read():
            return True
        t0 = time.perf_counter()
        result = run(step, self.training_s(t0))
        self.eval_s += time.perf_counter() - t0
        self.cold_step = step + 1
        self.evals.append(dataclasses.asdict(result))
        self.sink.scalars(step, result.scalars())
        if self.env.rank == 0:
            self.log.info(
                "eval step %d: %s (%.3f s)",
                step,
                " ".join(f"{k} {v:.5f}" for k, v in result.scalars().items()),
                result.eval_s,
            )
        return False

    def training_s(self, now: float) -> float:
        """Seconds of training in this run so far, evaluations left out (a resumed run restarts it)."""
        return now - self.wall0 - self.eval_s

    # ---- the end of the run ----
    def progress(self) -> dict[str, Any]:
        """What a checkpoint carries besides the training state: the history of the run."""
        return {
            "losses": self.losses,
            "grad_norms": self.grad_norms,
            "resumes": self.resumes,
            "evals": self.evals,
        }

    def stop(self) -> float:
        """Wall time of the training loop, from the first step to the last. Setup, teardown,
        checkpoint saves (their cost is the disk's) and evaluations (recorded with each one) are
        left out: they are not what a strategy's training costs."""
        sync(self.device)
        self.wall = time.perf_counter() - self.wall0 - self.checkpoint_s - self.eval_s
        return self.wall

    def steady_step_time(self) -> float:
        """Median over log intervals of the clean steps' mean time."""
        return statistics.median(self.interval_step_times) if self.interval_step_times else float("nan")

    def rank_summary(self) -> dict[str, Any]:
        """This rank's entry in metrics.json: its last sample, its own predictions, its mean bubble."""
        mine: dict[str, Any] = {"rank": self.env.rank, **self.last_sample, **self.theory, **self.time_split}
        mine["layout"] = layout(self.state.model, self.state.optimizer)
        if self.bubble_n:
            mine[Tag.BUBBLE] = self.bubble_sum / self.bubble_n
        return mine
