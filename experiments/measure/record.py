"""The one place where metric names and metrics.json's layout are defined.

`Tag` names every scalar a rank writes to TensorBoard (and the keys of each rank's entry in
metrics.json); `RunRecord` is metrics.json itself. The loop, TensorBoard, compare, job and bench
read names from here, so a misspelt metric is an AttributeError, not a silently empty column.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Tag:
    LOSS = "loss/train"
    # A mixture of experts' load-balancing loss: a part of loss/train, shown on its own.
    AUX_LOSS = "loss/aux"
    # Held-out metrics, at each evaluation's step: mean loss, accuracy (classification) and
    # perplexity (language modelling) over the evaluated samples.
    VAL_LOSS = "loss/val"
    VAL_ACC = "acc/val"
    VAL_PPL = "ppl/val"
    LR = "lr"
    GRAD_NORM = "grad_norm"
    STEP_TIME = "perf/step_time_s"
    DATA_TIME = "perf/data_time_s"
    SAMPLES = "perf/samples_per_s"
    RANK_SAMPLES = "perf/rank_samples_per_s"
    TOKENS = "perf/tokens_per_s"
    RANK_TOKENS = "perf/rank_tokens_per_s"
    MFU = "perf/mfu"
    # 1 when this node has at least one core (CPU) or device (GPU) per rank; 0 when ranks wait for
    # cores, so throughput, scaling, step time and bubble describe the machine, not the strategy.
    TIMING_MEANINGFUL = "perf/timing_meaningful"
    PIPE_BUSY = "pipeline/busy_s"
    BUBBLE = "pipeline/bubble_fraction"
    PARAMS_BYTES = "mem/params_bytes"
    GATHERED_BYTES = "mem/params_gathered_bytes"
    GRADS_BYTES = "mem/grads_bytes"
    OPTIM_BYTES = "mem/optim_bytes"
    MODEL_STATE_BYTES = "mem/model_state_bytes"
    PEAK_RSS = "mem/peak_rss_bytes"
    CUDA_PEAK = "mem/cuda_peak_allocated_bytes"
    # The peak from the step's start to the end of its backward: activations at their height.
    CUDA_PEAK_FWD_BWD = "mem/cuda_peak_fwd_bwd_allocated_bytes"
    # Bytes autograd keeps for backward, per micro-step (experiments/measure/activations.py).
    ACTIVATIONS = "mem/activations_bytes"
    THEORY_ACTIVATIONS = "theory/mem/activations_bytes"
    COMM_TOTAL_WIRE = "comm/total_wire_bytes"
    THEORY_MODEL_STATE = "theory/mem/model_state_bytes"
    THEORY_PAPER_MODEL_STATE = "theory/mem/paper_model_state_bytes"
    THEORY_BUBBLE = "theory/pipeline/bubble_fraction"
    THEORY_BUBBLE_RELATIVE = "theory/pipeline/bubble_relative_to_ideal"
    MEMORY_CATEGORIES = ("params", "params_gathered", "grads", "optim")

    @staticmethod
    def mem(category: str) -> str:
        return f"mem/{category}_bytes"

    @staticmethod
    def theory_mem(category: str) -> str:
        return f"theory/mem/{category}_bytes"

    @staticmethod
    def activations(block: str) -> str:
        return f"mem/activations_by_block/{block}"

    @staticmethod
    def comm(collective: str, what: str) -> str:
        """what: calls | bytes (payload S) | wire_bytes (sent by this rank, ring model)."""
        return f"comm/{collective}_{what}"

    @staticmethod
    def theory_comm(collective: str, what: str) -> str:
        return f"theory/comm/{collective}_{what}"

    @staticmethod
    def comm_axis(tag: str) -> tuple[str, str] | None:
        """(axis, collective) of a measured per-axis wire tag (comm/axis/<axis>/<coll>_wire_bytes)."""
        if not (tag.startswith("comm/axis/") and tag.endswith("_wire_bytes")):
            return None
        axis, _, coll = tag.removeprefix("comm/axis/").removesuffix("_wire_bytes").partition("/")
        return axis, coll

    @staticmethod
    def is_theory_wire(tag: str) -> bool:
        # Summed over the axes: the per-axis tags (theory/comm/axis/<axis>/...) split the same bytes.
        return tag.startswith("theory/comm/") and tag.endswith("_wire_bytes") and "/axis/" not in tag


@dataclass
class RunRecord:
    """metrics.json: what rank 0 writes once a job ends."""

    strategy: str
    world_size: int
    degrees: dict[str, int]
    model: str
    dataset: str
    launcher: str
    optimizer: str
    global_batch_size: int
    grad_accum_steps: int
    precision: str
    schedule: str | None
    microbatches: int | None
    steps: int
    params: int
    losses: list[float]
    grad_norms: list[float]
    final_loss: float
    # Median over log intervals of the clean steps' mean time (not step 1, not sampled steps).
    step_time_s: float
    samples_per_s: float
    tokens_per_s: float | None
    wall_s: float  # the training loop's, without checkpoint saves (checkpoint_s) and evaluations
    theory: dict[str, float]
    # One entry per rank: its last sampled step's measurements, its own predictions, its bubble.
    ranks: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    # Each time this run continued from a checkpoint: its step, and torchrun's restart count.
    resumes: list[dict[str, int]] = field(default_factory=list)
    checkpoint_s: float = 0.0  # seconds spent saving checkpoints during the loop
    timing_meaningful: bool = True
    timing_note: str = ""
    # The last evaluation's held-out metrics (None: not evaluated, or not this kind of task), and
    # every evaluation: {step, wall_s (training seconds before it), eval_s, val_loss, val_acc, val_ppl}.
    val_loss: float | None = None
    val_acc: float | None = None
    val_ppl: float | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    # The memory levers (train.ac, train.ac_every, train.compile).
    ac: str = "none"
    ac_every: int = 1
    compile: bool = False
    # The first step's wall time (lazy init, warm-up and, with train.compile, the compilation),
    # and compile_s = first_step_s - step_time_s: the compile's cost, kept out of step time.
    first_step_s: float = 0.0
    compile_s: float | None = None
    # What the parallel axes split: tokens per sample (context parallelism), experts per mixture
    # (expert parallelism); 0 where the model has none.
    seq_len: int = 0
    experts: int = 0
    # The strategy advisor's prediction for this job's config on cfg.cluster (experiments/plan):
    # step time and its split, memory per rank by category; None where train.predict=false.
    plan: dict[str, Any] | None = None

    def objective(self, name: str) -> float | None:
        """The number a sweeper optimises (train.objective)."""
        return {
            "val_loss": self.val_loss,
            "train_loss": self.final_loss,
            "samples_per_s": self.samples_per_s,
        }[name]

    def write(self, job_dir: Path) -> None:
        write_atomic(job_dir / METRICS_FILE, json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def read(cls, job_dir: Path) -> RunRecord:
        raw: dict[str, Any] = json.loads((job_dir / METRICS_FILE).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def tracked_memory_bytes(self) -> float | None:
        """Model state + activations on the rank that holds most, where both were measured."""
        both = [
            r[Tag.MODEL_STATE_BYTES] + r[Tag.ACTIVATIONS]
            for r in self.ranks
            if r and Tag.MODEL_STATE_BYTES in r and Tag.ACTIVATIONS in r
        ]
        return max(both) if both else None

    def peak_memory_bytes(self) -> float:
        return float(max((r.get(Tag.PEAK_RSS, r.get(Tag.CUDA_PEAK, 0)) for r in self.ranks), default=0))


def read_metrics(job_dir: Path) -> dict[str, Any]:
    """metrics.json as plain data (tests check the file's layout itself)."""
    return json.loads((job_dir / METRICS_FILE).read_text())
