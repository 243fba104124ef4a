"""The range of every number a user can set: one table, checked before any process starts.

The structured config already types each key; this says which values of that type can run. Every
float must also be finite: `train.lr=inf` composes as a float, and nan passes `< 0` checks.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from experiments.config.schema import Config, ConfigError


@dataclass(frozen=True)
class Bound:
    low: float
    high: float | None = None
    low_open: bool = False  # the low end itself is not allowed
    high_open: bool = False

    def _above_low(self, v: float) -> bool:
        return v > self.low if self.low_open else v >= self.low

    def _below_high(self, v: float) -> bool:
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def holds(self, v: float) -> bool:
        return self._above_low(v) and self._below_high(v)

    def broken_by(self, v: float) -> str:
        """The side of the range that v falls outside, as the refusal says it."""
        if not self._below_high(v):
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"{'>' if self.low_open else '>='} {self.low:g}"


AT_LEAST_1 = Bound(1)
AT_LEAST_0 = Bound(0)
ABOVE_0 = Bound(0, low_open=True)
TEN_YEARS_S = 10 * 365 * 24 * 3600
INT64_MAX = 2**63 - 1

BOUNDS: dict[str, Bound] = {
    "seed": Bound(0, INT64_MAX),  # torch.manual_seed's range
    "train.steps": AT_LEAST_1,
    # The advisor's cluster (experiments/plan/cluster.py says "no devices" for nodes and devices).
    "cluster.memory_gib": ABOVE_0,
    "cluster.peak_tflops_bf16": AT_LEAST_0,
    "cluster.peak_tflops_tf32": AT_LEAST_0,
    "cluster.peak_tflops_fp32": AT_LEAST_0,
    "cluster.matmul_efficiency": Bound(0, 1, low_open=True),
    "cluster.attention_efficiency": Bound(0, 1, low_open=True),
    "cluster.half_efficiency_gflop": AT_LEAST_0,
    "cluster.mem_gb_per_s": ABOVE_0,
    "cluster.op_overhead_us": AT_LEAST_0,
    "cluster.intra.alpha_us": AT_LEAST_0,
    "cluster.intra.gb_per_s": ABOVE_0,
    "cluster.inter.alpha_us": AT_LEAST_0,
    "cluster.inter.gb_per_s": ABOVE_0,
    "cluster.overlap": Bound(0, 1),
    "train.global_batch_size": AT_LEAST_1,
    "train.grad_accum_steps": AT_LEAST_1,
    "train.log_every": AT_LEAST_1,
    "train.ac_every": AT_LEAST_1,
    "train.lr": ABOVE_0,
    "train.momentum": Bound(0, 1, high_open=True),  # 1 or more never forgets a gradient: the run diverges
    "train.weight_decay": AT_LEAST_0,
    "train.grad_clip": AT_LEAST_0,
    "train.warmup_steps": AT_LEAST_0,
    "train.checkpoint_every": AT_LEAST_0,
    "train.keep_checkpoints": AT_LEAST_0,
    "train.measure_every": AT_LEAST_0,
    "train.peak_tflops": AT_LEAST_0,
    "train.eval_every": AT_LEAST_0,
    "train.profile_from": AT_LEAST_1,
    "train.profile_steps": AT_LEAST_1,
    "train.eval_samples": Bound(-1),  # -1: the whole held-out split
    "strategy.tp": AT_LEAST_1,
    "strategy.pp": AT_LEAST_1,
    "strategy.dp_replicate": AT_LEAST_1,
    "strategy.cp": AT_LEAST_1,
    "strategy.ep": AT_LEAST_1,
    # DDP turns it into bytes in a 64-bit integer; a terabyte bucket is already one bucket.
    "strategy.bucket_cap_mb": Bound(0, 1e6, low_open=True),
    "strategy.microbatches": AT_LEAST_1,
    "strategy.stages_per_rank": AT_LEAST_0,
    "model.hidden": AT_LEAST_1,
    # Each block is Python objects even on the meta device: 1e8 of them hang the check before launch.
    "model.layers": Bound(1, 10_000),
    "model.ffn_mult": AT_LEAST_1,
    "model.heads": AT_LEAST_1,
    "model.channels": AT_LEAST_1,
    "model.max_seq_len": AT_LEAST_1,
    "model.kv_heads": AT_LEAST_0,  # 0: one kv head per query head
    "model.multiple_of": AT_LEAST_1,
    "model.rope_theta": ABOVE_0,
    "model.norm_eps": ABOVE_0,
    "model.experts": Bound(0, 10_000),  # 0: a dense feed-forward
    "model.top_k": AT_LEAST_1,
    "model.aux_loss_coef": AT_LEAST_0,
    "dataset.num_samples": AT_LEAST_1,
    "dataset.val_samples": AT_LEAST_1,
    "dataset.num_classes": Bound(2),
    "dataset.vocab_size": Bound(2),
    "dataset.seq_len": AT_LEAST_1,
    "dataset.num_workers": Bound(0, 256),  # processes per rank; more hangs starting them
    "launcher.nproc_per_node": AT_LEAST_1,
    "launcher.nnodes": AT_LEAST_1,
    "launcher.node_rank": AT_LEAST_0,  # and < launcher.nnodes: experiments/run/launch.py:check_launcher
    "launcher.max_restarts": AT_LEAST_0,
    "launcher.threads_per_rank": Bound(0, 1024),  # torch.set_num_threads fails past the OS's limits
    # 0 would read as unset (torch's default) in init_distributed. The ceiling is what every
    # consumer of a wait holds: datetime.timedelta (~8.6e13 s) and torch's c10d and store timeouts.
    "launcher.timeout_s": Bound(0, TEN_YEARS_S, low_open=True),
    "launcher.join_timeout_s": Bound(0, TEN_YEARS_S, low_open=True),
    "launcher.grace_s": Bound(0, TEN_YEARS_S),
    "launcher.gpus_per_node": Bound(-1),  # -1: one per rank
}

# Keys that name a file or a folder (train.resume also takes auto | never).
PATH_KEYS = ("train.resume", "dataset.root", "dataset.text_file")

# rdzv_id names torch's log folder inside the job dir and the rendezvous on the store.
RDZV_ID = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63})?")


def leaves(node: object, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a config dataclass; a model's arguments are keys of
    the model (`model.hidden`), as its config spells them."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}.{k}")]
    if not dataclasses.is_dataclass(node):
        return [(prefix, node)]
    out: list[tuple[str, object]] = []
    for f in dataclasses.fields(node):
        key = prefix if f.name == "args" else f"{prefix}.{f.name}" if prefix else f.name
        out += leaves(getattr(node, f.name), key)
    return out


def finite_number(value: object) -> bool:
    """A real number a file may hold where a measurement belongs: not a bool, NaN or infinity."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def has_control_char(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def check_ranges(cfg: Config) -> None:
    values = dict(leaves(cfg))
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
        if isinstance(value, str) and has_control_char(value):
            # A newline would start a line of its own in logs and in any script that carries it.
            raise ConfigError(f"{key}={value!r} holds a control character (a newline?); remove it")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            # TensorBoard's steps, torch's tensors and timedelta hold 64-bit integers.
            raise ConfigError(f"{key}={value} must be <= {INT64_MAX} (a 64-bit integer)")
    for key, bound in BOUNDS.items():
        value = values.get(key)
        # A number: a user's model may give these names arguments of other types.
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and not bound.holds(value):  # type: ignore[arg-type]
            raise ConfigError(f"{key}={value} must be {bound.broken_by(value)}")  # type: ignore[arg-type]
    for key in PATH_KEYS:
        _check_path(key, values[key])  # type: ignore[arg-type]
    shape = cfg.dataset.input_shape
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(
            f"dataset.input_shape={list(shape)} must be one or more sizes >= 1, e.g. [32] or [3,32,32]"
        )
    if not RDZV_ID.fullmatch(cfg.launcher.rdzv_id):
        raise ConfigError(
            f"launcher.rdzv_id={cfg.launcher.rdzv_id} may hold only letters, digits, '_', '-' and '.' "
            "(at most 64, starting with a letter or digit): it names a folder in the job dir"
        )


def _check_path(key: str, value: str) -> None:
    """A path the OS cannot even look up (`~user` of no such user, a name longer than it allows)
    fails here naming its key, not later as a traceback or an error blamed on another key."""
    if not value or (key == "train.resume" and value in ("auto", "never")):
        return
    try:
        Path(value).expanduser().exists()  # a missing path is False; ENAMETOOLONG and the like raise
    except (RuntimeError, OSError) as e:
        shown = value if len(value) <= 80 else f"{value[:60]}… ({len(value)} characters)"
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).rstrip(".")
        raise ConfigError(f"{key}={shown}: {why}; give a path that exists on this machine") from None
