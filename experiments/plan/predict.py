"""One configuration's prediction: memory per rank by category, and the step-time split, on a cluster.

The memory is the run-time theory's (parallel/costs.py's model of what each strategy's
implementation holds, experiments/measure/activation_theory.py's activations) on the Settings
experiments/plan/sizes.py derives; one code path for a job that ran (metrics.json's `plan`) and
for a cluster nobody has.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from data.spec import DataSpec
from experiments.config.schema import AC, Config
from experiments.measure.activation_theory import predicted_activation_bytes
from experiments.plan.cluster import PROCESS_BYTES, Machine
from experiments.plan.profile import ModelProfile
from experiments.plan.sizes import rank_setting
from experiments.plan.timing import StepTime, compute_dtype, step_time
from parallel.costs import Payload, Setting, fsdp_comm, optimizer_state_bytes_per_param, pp_comm, tp_comm
from parallel.mesh import Degrees
from parallel.registry import StrategySpec, fsdp_stage, get_spec
from parallel.strategies.pipeline import stages_per_rank


def fsdp_tp_pp_comm(x: Setting) -> Payload | None:
    """FSDP within each pipeline stage's TP shard: the three parts' payloads on their own axes.
    The registry predicts none for the 3D hybrid (its check is per part): the advisor composes it."""
    tp, pp = tp_comm(x), pp_comm(x)
    return None if tp is None or pp is None else {**fsdp_comm(x), **tp, **pp}


def payload_of(spec: StrategySpec, x: Setting) -> Payload | None:
    comm = spec.comm or (fsdp_tp_pp_comm if spec.pipelined and spec.needs_tp_plan else None)
    if comm is None:
        return None
    payload = comm(x)
    t, s = x.cfg.train, x.cfg.strategy
    if payload is not None or (t.precision != "bf16" and t.ac == AC.none and not s.sequence_parallel):
        return payload
    # The checked cost models leave bf16, recompute under context parallelism and sequence
    # parallelism unpredicted (autocast picks each tensor's dtype; recompute runs the ring again;
    # SP's collectives were never counted). The advisor prices the fp32 payload, an upper bound
    # (the residual stream, the pipeline's hand-offs and gradients stay fp32 under autocast), a
    # checkpointed layer's ring forward once more, and SP's all-gather + reduce-scatter in place
    # of each all-reduce (the same ring bytes, Korthikanti et al. §4.2.2).
    plain = dataclasses.replace(
        x.cfg,
        train=dataclasses.replace(t, precision="fp32", ac=AC.none),
        strategy=dataclasses.replace(s, sequence_parallel=False),
    )
    payload = comm(dataclasses.replace(x, cfg=plain))
    if payload is None:
        return None
    d = x.degrees
    cp, ring, tp_axis = d.cp, d.axis("cp"), d.axis("tp")
    again = (3 * (cp - 1) + cp) / (2 * (cp - 1) + cp) if t.ac != AC.none and cp > 1 else 1.0
    out: Payload = {}
    for (axis, coll), (size, n, calls) in payload.items():
        if axis == ring and coll in ("send", "recv") and size is not None and again != 1.0:
            out[(axis, coll)] = (size * again, n, calls and round(calls * again))
        elif s.sequence_parallel and axis == tp_axis and coll == "all_reduce":
            out[(axis, "all_gather")] = (size, n, calls)
            out[(axis, "reduce_scatter")] = (size, n, calls)
        else:
            out[(axis, coll)] = (size, n, calls)
    return out


def model_state_bytes(memory: dict[str, float]) -> float:
    """Of a rank's bytes by category, its model state: all but activations and buffers."""
    return sum(v for k, v in memory.items() if k not in ("activations", "buffers"))


def model_state(spec: StrategySpec, x: Setting) -> dict[str, float]:
    # The hybrids (fsdp_tp, fsdp_tp_pp) name no stage of their own: FSDP2 over their TP shards.
    stage = spec.zero_stage(x.cfg.strategy) or (
        fsdp_stage(x.cfg.strategy) if spec.fill == "dp_shard" else None
    )
    if stage is not None:
        return spec.memory(stage, x)
    b, psi = x.sizes.param_bytes, x.sizes.psi  # no ZeRO stage (the parameter server): all of it
    return {"params": b * psi, "grads": b * psi, "optim": optimizer_state_bytes_per_param(x.cfg) * psi}


def in_flight(cfg: Config, spec: StrategySpec, pp: int, pp_rank: int) -> float:
    """Micro-batches of a pipeline rank's activations held at once: GPipe all of them; 1F1B at
    most the stages ahead (Narayanan et al. 2021); an interleaved schedule up to p·v − rank
    micro-batches of one of its v stages (each 1/v of its blocks) while it warms up."""
    s = cfg.strategy
    if not spec.pipelined or spec.one_batch:
        return 1
    m = s.microbatches
    if s.schedule == "gpipe":
        return m
    v = stages_per_rank(s.schedule, s.stages_per_rank)
    return min(m * v, pp * v - pp_rank) / v


@dataclass
class Prediction:
    cfg: Config
    overrides: list[str]
    degrees: Degrees
    # The fullest rank's bytes: params, params_gathered, grads, optim, activations, buffers.
    memory: dict[str, float]
    time: StepTime | None
    samples_per_s: float | None
    tokens_per_s: float | None
    mfu: float | None
    fits: bool
    over_bytes: float  # how far the fullest rank is over its device's memory (<= 0: fits)
    # The most any rank holds of model state + one micro-step's activations (a pipeline's: all its
    # micro-batches'): what paralab measures by category on every rank (mem/model_state_bytes +
    # mem/activations_bytes).
    tracked: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join(self.overrides)

    @property
    def model_state(self) -> float:
        return model_state_bytes(self.memory)

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    def as_record(self) -> dict[str, Any]:
        """The prediction as metrics.json carries it (`plan`) and plan.csv lists it."""
        t = self.time
        out: dict[str, Any] = {
            "config": self.label,
            "world_size": self.degrees.world_size,
            "memory_bytes": self.total,
            "tracked_memory_bytes": self.tracked,
            "model_state_bytes": self.model_state,
            **{f"{k}_bytes": v for k, v in self.memory.items()},
            "fits": self.fits,
            "over_bytes": self.over_bytes,
            "samples_per_s": self.samples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "notes": self.notes,
        }
        if t is not None:
            out |= {
                "step_time_s": t.step_s,
                "compute_s": t.compute_s,
                "recompute_s": t.recompute_s,
                "optimizer_s": t.optimizer_s,
                "exposed_comm_s": t.exposed_total_s,
                "bubble_s": t.bubble_s,
                **{f"comm_s/{a}": v for a, v in sorted(t.comm_s.items())},
                **{f"exposed_s/{a}": v for a, v in sorted(t.exposed_s.items())},
            }
        return out


@dataclass
class RankMemory:
    """Each pipeline rank's bytes by category (one entry off a pipeline), and the fullest's."""

    settings: list[Setting]
    memories: list[dict[str, float]]
    worst: dict[str, float]
    tracked: float  # see Prediction.tracked
    notes: list[str]


def rank_memory(
    cfg: Config, degrees: Degrees, profile: ModelProfile, data: DataSpec, cpu: bool
) -> RankMemory:
    """Memory by category on every pipeline rank (its layout is all it reads of `profile`): the
    advisor's and the pre-launch check's count."""
    spec = get_spec(cfg.strategy.name)
    pps = range(degrees.pp) if spec.pipelined else range(1)
    settings = [rank_setting(profile, cfg, degrees, spec, data, r) for r in pps]
    notes: list[str] = []
    memories, worst, tracked = [], {}, 0.0
    for x in settings:
        mem = dict(model_state(spec, x))
        samples = x.local_batch / cfg.train.grad_accum_steps
        if spec.pipelined and not spec.one_batch:
            samples /= cfg.strategy.microbatches
        acts = predicted_activation_bytes(
            cfg,
            data,
            samples,
            x.sizes.block_positions,
            x.sizes.stem_here,
            x.sizes.head_here,
            degrees.tp if spec.needs_tp_plan else 1,
            degrees.cp,
        )
        if acts is None and "activations not counted for this model" not in notes:
            notes.append("activations not counted for this model")
        # As the meter counts them: every micro-batch of a pipeline's step (experiments/measure/activations.py).
        micro = cfg.strategy.microbatches if spec.pipelined and not spec.one_batch else 1
        tracked = max(tracked, sum(mem.values()) + (acts or 0.0) * micro)
        mem["activations"] = (acts or 0.0) * in_flight(cfg, spec, degrees.pp, x.pp_rank)
        mem["buffers"] = _buffers(spec, x, cpu)
        memories.append(mem)
        if sum(mem.values()) > sum(worst.values()):
            worst = mem
    if degrees.ep > 1:
        notes.append("expert parallelism's dispatch buffers not counted")
    return RankMemory(settings, memories, worst, tracked, notes)


def predict_config(
    cfg: Config,
    degrees: Degrees,
    profile: ModelProfile,
    data: DataSpec,
    machine: Machine,
    overrides: list[str],
    timed: bool = True,
) -> Prediction:
    """`timed=False`: memory only (what fits), no step time."""
    spec = get_spec(cfg.strategy.name)
    held = rank_memory(cfg, degrees, profile, data, machine.cpu)
    settings, worst, notes = held.settings, held.worst, held.notes
    payloads = [payload_of(spec, x) for x in settings]
    time = step_time(settings, payloads, held.memories, profile, spec, machine) if timed else None
    if time is None and timed:
        notes.append(f"strategy={cfg.strategy.name}'s communication is not predicted here: no step time")
    ranks_per_node = min(degrees.world_size, machine.devices_per_node)
    have = machine.memory_per_rank(ranks_per_node)
    over = sum(worst.values()) - have
    g = cfg.train.global_batch_size
    sps = g / time.step_s if time is not None else None
    tps = sps * data.seq_len if sps is not None and data.task == "lm" else None
    peak = machine.peak_flops(compute_dtype(cfg))
    mfu = (
        profile.flops_per_sample() * sps / (degrees.world_size * peak)
        if sps is not None and peak and not machine.cpu
        else None
    )
    return Prediction(
        cfg, overrides, degrees, worst, time, sps, tps, mfu, over <= 0, over, held.tracked, notes
    )


def _buffers(spec: StrategySpec, x: Setting, cpu: bool) -> float:
    """Beyond model state and activations: DDP's gradient buckets (a copy of every gradient unless
    they are views), FSDP's unsharded gradient of one group for its reduce-scatter and the next
    group's prefetched gather, and what a process holds before its model."""
    b, s = x.sizes.param_bytes, x.cfg.strategy
    out = float(PROCESS_BYTES["cpu" if cpu else "cuda"])
    if spec.wraps_ddp and not s.gradient_as_bucket_view:
        out += b * x.sizes.local_psi
    elif spec.fill == "dp_shard" and x.sizes.blocks_here:
        out += (
            2 * b * (x.sizes.local_psi - sum(math.prod(r) for r in x.sizes.root_shapes)) / x.sizes.blocks_here
        )
    return out
