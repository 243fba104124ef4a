"""Step time, predicted term by term as experiments/measure/timeline.py splits a measured step:
compute (forward, backward, recompute, optimizer), communication per mesh axis (exposed and
hidden), pipeline bubble.

- Compute: each op of the profile priced on the cluster: a matmul by its FLOPs at the throughput
  measured for its size, other ops by the bytes they write at memory bandwidth, plus a per-op
  launch cost (added on a CPU, where the host runs the op; the larger of the two on a GPU, where
  launches run ahead of the kernels). A tensor-parallel rank does 1/tp of a block's matmuls, a
  context-parallel rank 1/cp of every token's work.
- Communication: the strategy's own payload (parallel/costs.py: bytes and calls per axis and
  collective, the same the communication check holds measurements to), each call α + bytes·β
  on the link its group crosses (inside a node, or between nodes: the slowest on the ring).
- Overlap: DDP's bucketed all-reduce and HSDP's replica all-reduce can hide behind backward, FSDP's
  gathers behind forward and backward and its reduce-scatters behind backward, the context ring
  behind attention; the last bucket (the first gather) cannot. `cluster.overlap` says how much of
  that window really hides comm. Tensor-parallel all-reduces, pipeline hand-offs, ZeRO-1's
  broadcast, the all-to-all and the gradient-norm all-reduce wait on the critical path.
- Bubble: (p − 1)/v stage-microbatch times for GPipe, 1F1B and the interleaved schedules
  (Narayanan et al. 2021); a third of that for the zero-bubble ones, whose weight gradients fill it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from experiments.config.schema import AC, Config
from experiments.measure.flops import compute_dtype as flops_dtype
from experiments.measure.theory import ring_bytes
from experiments.plan.cluster import Machine
from experiments.plan.profile import ModelProfile, Part
from parallel.costs import Payload, Setting, fsdp_axis, optimizer_state_bytes_per_param
from parallel.mesh import WORLD, Degrees
from parallel.registry import StrategySpec
from parallel.strategies.pipeline import stages_per_rank

# Ops per parameter tensor of one optimizer step, uncalibrated (for-loop implementations, CPU's
# default); and the loop's own per tensor and step: its gradient norm's square and sum.
OPTIMIZER_OPS = {"sgd": 2, "sgd_momentum": 4, "adamw": 12}
NORM_OPS = 2
ZERO_BUBBLE = ("interleaved_zb", "zbv")


@dataclass
class StepTime:
    compute_s: float  # forward + backward + recompute + optimizer, on the slowest rank
    recompute_s: float
    optimizer_s: float
    comm_s: dict[str, float] = field(default_factory=dict)  # axis -> all its collectives' time
    exposed_s: dict[str, float] = field(default_factory=dict)  # axis -> what the step waits for
    bubble_s: float = 0.0

    @property
    def step_s(self) -> float:
        return self.compute_s + sum(self.exposed_s.values()) + self.bubble_s

    @property
    def exposed_total_s(self) -> float:
        return sum(self.exposed_s.values())


def compute_dtype(cfg: Config) -> str:
    """The dtype the matmuls run in, as MFU reads it (experiments/measure/flops.py), with torch's
    defaults for fp32 on a GPU: matmuls in full fp32 (no TF32), which the advisor prices."""
    return flops_dtype(cfg, tf32_matmul=False, tf32_conv=False, has_conv=False)


@dataclass
class Pricing:
    machine: Machine
    threads: int
    dtype: str
    # (part, scale, tp, matmuls only) -> seconds: a model's blocks share one profile's numbers.
    _seen: dict[tuple, float] = field(default_factory=dict)

    def part_s(
        self, part: Part | None, scale: float, tp: int, cp: int = 1, matmuls_only: bool = False
    ) -> float:
        """One part's ops at `scale` × the profiled tokens (a cp rank's share included), its
        matmuls split tp ways."""
        if part is None:
            return 0.0
        key = (id(part), scale, tp, cp, matmuls_only)
        if key not in self._seen:
            self._seen[key] = self._price(part, scale, tp, cp, matmuls_only)
        return self._seen[key]

    @property
    def matmul_dtype(self) -> tuple[float, str]:
        """(slowdown, the dtype to price at): double precision at half fp32's rate (calibration
        measures fp32)."""
        return (2.0, "fp32") if self.dtype == "fp64" else (1.0, self.dtype)

    def attention_s(self, part: Part, scale: float, tp: int, cp: int) -> float:
        """The part's fused attention on this rank: its heads (tp) of its samples; a context-parallel
        rank (scale has its 1/cp) does 1/cp of each sequence's causal work."""
        m, out = self.machine, 0.0
        slow, dtype = self.matmul_dtype
        per_call = part.attention_flops / max(len(part.attention), 1)
        for bh, sq, sk, d in part.attention:
            heads = bh * scale * cp / tp
            measured = m.attention_s(heads, sq, d, part.backward, self.threads, dtype)
            if measured is not None:
                out += measured / cp * slow
            else:
                ratio = per_call / (2 * bh * sq * sk * d)  # its matmuls, as multiples of QKᵀ
                eff = m.cfg.attention_efficiency
                out += ratio * m.matmul_s((heads * sq / cp, d, sk), self.threads, dtype, eff) * slow
        return out

    def _price(self, part: Part, scale: float, tp: int, cp: int, matmuls_only: bool) -> float:
        m = self.machine
        slow, dtype = self.matmul_dtype
        mm = 0.0
        for dims, grows in part.matmuls:
            shape = [d * scale if g else d for d, g in zip(dims, grows, strict=True)]
            if tp > 1:  # a column- or row-parallel shard: its weight's larger side split
                i = max((j for j in range(3) if not grows[j]), key=lambda j: shape[j], default=None)
                if i is not None:
                    shape[i] /= tp
            mm += m.matmul_s(tuple(shape), self.threads, dtype) * slow  # type: ignore[arg-type]
        mm += self.attention_s(part, scale, tp, cp)
        if matmuls_only:
            return mm
        # Under bf16 autocast the regions' activations are matmul outputs, in bf16; the residual
        # stream and the norms stay fp32. (The profile runs in fp32: meta tensors skip autocast.)
        half = 0.5 if self.dtype == "bf16" else 1.0
        work = mm + sum(
            m.memory_s(b * (scale if g else 1.0) * (half / tp if region else 1.0), self.threads)
            for b, g, region in part.writes
        )
        launch = part.ops * m.op_s(self.threads) + part.views * m.host_s("view", self.threads)
        return work + launch if m.cpu else max(work, launch)


def _checkpointed(cfg: Config, block_id: int) -> bool:
    t = cfg.train
    return t.ac != AC.none and (block_id + 1) % t.ac_every == 0


def _micro_batch(x: Setting, profile: ModelProfile, spec: StrategySpec) -> tuple[float, int, int]:
    """(one micro-batch on this rank as a multiple of the profiled tokens, a cp rank's share
    included; the micro-batches per step; the tp degree its blocks' matmuls split)."""
    t, s = x.cfg.train, x.cfg.strategy
    pipelined_micro = s.microbatches if spec.pipelined and not spec.one_batch else 1
    micro_samples = x.local_batch / t.grad_accum_steps / pipelined_micro
    tp = x.degrees.tp if spec.needs_tp_plan else 1
    return micro_samples / profile.samples / x.degrees.cp, t.grad_accum_steps * pipelined_micro, tp


def _rank_compute(
    x: Setting, profile: ModelProfile, spec: StrategySpec, price: Pricing
) -> tuple[float, float, int]:
    """(forward + backward + recompute of one micro-batch, its recompute, the micro-batches per step)."""
    cfg, d, sizes = x.cfg, x.degrees, x.sizes
    t = cfg.train
    scale, micro_steps, tp = _micro_batch(x, profile, spec)
    total = recompute = 0.0
    parts = [*(["stem"] if sizes.stem_here else [])]
    parts += [profile.block_names[i] for i in sizes.block_positions]
    parts += ["head"] if sizes.head_here else []
    for name in parts:
        block = name not in ("stem", "head")
        ways = tp if block else 1
        fwd = price.part_s(profile.forward.get(name), scale, ways, d.cp)
        total += fwd + price.part_s(profile.backward.get(name), scale, ways, d.cp)
        if block and _checkpointed(cfg, profile.block_names.index(name)):
            # Full: the block's forward again. Selective keeps the matmul and attention outputs.
            mms = price.part_s(profile.forward.get(name), scale, ways, d.cp, matmuls_only=True)
            again = fwd if t.ac == AC.full else fwd - mms
            recompute += again
    return total + recompute, recompute, micro_steps


def _optimizer_s(
    x: Setting, memory: dict[str, float], spec: StrategySpec, profile: ModelProfile, price: Pricing
) -> float:
    """One optimizer step on this rank's shard, and the loop's gradient norm over it. FSDP2's
    parameters are DTensors, and so are a TP plan's (and an expert-parallel mixture's): each of
    their optimizer ops dispatches through DTensor, which the host pays per tensor."""
    cfg, b, m = x.cfg, x.sizes.param_bytes, price.machine
    t = cfg.train
    kind = "adamw" if t.optimizer == "adamw" else ("sgd_momentum" if t.momentum else "sgd")
    elements = memory.get("params", b * x.sizes.psi) / b
    k = optimizer_state_bytes_per_param(cfg)
    touched = elements * (b + 2 * k)  # writes: the parameter and its state
    tensors = len(x.sizes.local_shapes) + len(x.sizes.expert_shapes)
    if spec.fill == "dp_shard":
        dtensors = tensors
    else:
        in_plan = len(profile.tp_split) if spec.needs_tp_plan else 0
        dtensors = in_plan * x.sizes.blocks_here + len(x.sizes.expert_shapes)
    per_tensor = m.host_s(kind, price.threads)
    if per_tensor:
        host = (tensors - dtensors) * per_tensor + dtensors * m.host_s(f"{kind}_dtensor", price.threads)
    elif m.cpu:
        host = tensors * OPTIMIZER_OPS[kind] * m.op_s(price.threads)
    else:
        host = OPTIMIZER_OPS[kind] * math.ceil(tensors / 64) * m.op_s(price.threads)  # foreach kernels
    host += tensors * NORM_OPS * m.op_s(price.threads)
    return m.memory_s(touched, price.threads) + host


def _framework_s(
    x: Setting, spec: StrategySpec, profile: ModelProfile, micro_steps: int, price: Pricing
) -> float:
    """What the strategy's wrapping costs the host beyond its collectives: FSDP2's hooks and
    copies per group and micro-step, DDP's autograd hook per parameter, DTensor's dispatch per
    tensor-parallel linear (forward and two backward)."""
    m, sizes = price.machine, x.sizes
    out = 0.0
    if spec.fill == "dp_shard":
        groups = sizes.blocks_here + 1 + sizes.expert_groups
        out += groups * micro_steps * m.host_s("fsdp_group", price.threads)
    if spec.wraps_ddp:
        out += len(sizes.local_shapes) * micro_steps * m.host_s("ddp_param", price.threads)
    if spec.needs_tp_plan:
        linears = sum(1 for name in profile.tp_split if name.endswith("weight"))
        out += 3 * linears * sizes.blocks_here * micro_steps * m.host_s("tp_linear", price.threads)
    return out


# Mesh dims outermost first, with dp_shard as its two parts (expert parallelism's split).
_ORDER = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp")
_NAMES = ("dp_shard_mod_ep", "dp_replicate", "dp_shard", "pp", "cp", "tp", "ep")


def across_nodes(axis: str, d: Degrees, machine: Machine) -> bool:
    """Whether the ranks of `axis` sit on more than one node: the innermost dims share a node."""
    if machine.cfg.nodes == 1:
        return False
    if axis == WORLD:
        return True
    dims: list[str] = []
    rest = axis
    while rest:  # the dims of a name Degrees.axis made: "dp_shard_cp" -> dp_shard, cp
        name = next((n for n in _NAMES if rest == n or rest.startswith(n + "_")), None)
        if name is None:
            return False
        dims += ["dp_shard_mod_ep", "ep"] if name == "dp_shard" else [name]
        rest = rest[len(name) + 1 :]
    size = d.as_dict() | {"dp_shard_mod_ep": d.dp_shard_mod_ep}
    innermost = max(_ORDER.index(n) for n in dims)
    stride = math.prod(size[n] for n in _ORDER[innermost + 1 :])
    return stride * math.prod(size[n] for n in dims) > machine.devices_per_node


def _all_to_all_bytes(x: Setting) -> float:
    """The router's choice, as if balanced: each mixture sends every token's top-k copies out and
    back, forward and backward."""
    cfg = x.cfg
    tokens = x.local_batch * max(x.seq_len, 1) / x.degrees.cp
    return (
        4
        * tokens
        * cfg.model.get("top_k", 1)
        * cfg.model.get("hidden", 0)
        * x.sizes.param_bytes
        * x.sizes.expert_groups
    )


def comm_times(
    x: Setting,
    payload: Payload,
    spec: StrategySpec,
    machine: Machine,
    fwd_s: float,
    bwd_s: float,
    attn_s: float,
) -> tuple[dict[str, float], dict[str, float]]:
    """(axis -> seconds, axis -> exposed seconds)."""
    d, cfg = x.degrees, x.cfg
    total: dict[str, float] = {}
    exposed: dict[str, float] = {}
    ddp_axis = d.axis("dp_replicate")
    fsdp_axes = {fsdp_axis(d), d.axis("dp_shard_mod_ep", "cp") if d.cp > 1 else d.axis("dp_shard_mod_ep")}
    groups = x.sizes.blocks_here + 1 + x.sizes.expert_groups
    window = {"backward": bwd_s, "both": fwd_s + bwd_s, "attention": attn_s}
    for (axis, coll), (size, n, calls) in payload.items():
        if size is None:
            size = _all_to_all_bytes(x) if coll == "all_to_all" else 0.0
        if calls is None:
            calls = max(1, math.ceil(size / (cfg.strategy.bucket_cap_mb * 2**20)))
        wire = ring_bytes(coll, size, n)
        secs = machine.collective_s(coll, n, calls, wire, across_nodes(axis, d, machine))
        hides, last = None, secs
        if spec.wraps_ddp and axis == ddp_axis and coll == "all_reduce":
            hides, last = "backward", secs / calls
        elif spec.fill == "dp_shard" and axis in fsdp_axes and coll in ("all_gather", "reduce_scatter"):
            hides, last = ("both" if coll == "all_gather" else "backward"), secs / max(calls, 1)
        elif spec.fill == "dp_shard" and axis == ddp_axis and coll == "all_reduce":
            hides, last = "backward", secs / groups  # HSDP's replicas: one shard per group
        elif axis == d.axis("cp") and coll in ("send", "recv"):
            hides, last = "attention", secs / max(calls, 1)
        shown = secs if hides is None else max(secs - machine.cfg.overlap * window[hides], last)
        total[axis] = total.get(axis, 0.0) + secs
        exposed[axis] = exposed.get(axis, 0.0) + min(shown, secs)
    return total, exposed


def step_time(
    settings: list[Setting],
    payloads: list[Payload | None],
    memories: list[dict[str, float]],
    profile: ModelProfile,
    spec: StrategySpec,
    machine: Machine,
) -> StepTime | None:
    """The step on each pipeline rank (one Setting each; one in all without a pipeline); the
    slowest sets the pace. None where the strategy's communication is not predicted."""
    if any(p is None for p in payloads):
        return None
    cfg, d = settings[0].cfg, settings[0].degrees
    ranks_per_node = min(d.world_size, machine.devices_per_node)
    price = Pricing(machine, machine.threads(ranks_per_node), compute_dtype(cfg))
    worst: StepTime | None = None
    per_micro_max = 0.0
    for x, payload, memory in zip(settings, payloads, memories, strict=True):
        per_micro, recompute, micro_steps = _rank_compute(x, profile, spec, price)
        per_micro_max = max(per_micro_max, per_micro)
        compute = per_micro * micro_steps
        bwd_share = 2 / 3  # backward is ~2/3 of a forward+backward's work
        attn = _attention_s(x, profile, spec, price) * micro_steps
        total, exposed = comm_times(
            x, payload or {}, spec, machine, compute * (1 - bwd_share), compute * bwd_share, attn
        )
        opt = _optimizer_s(x, memory, spec, profile, price)
        compute += opt + _framework_s(x, spec, profile, micro_steps, price)
        here = StepTime(compute, recompute * micro_steps, opt, total, exposed)
        if worst is None or here.step_s > worst.step_s:
            worst = here
    assert worst is not None
    if spec.pipelined:
        s = cfg.strategy
        v = stages_per_rank(s.schedule, s.stages_per_rank)
        bubble = (d.pp - 1) / v * per_micro_max * cfg.train.grad_accum_steps
        worst.bubble_s = bubble / 3 if s.schedule in ZERO_BUBBLE else bubble
    return worst


def _attention_s(x: Setting, profile: ModelProfile, spec: StrategySpec, price: Pricing) -> float:
    """One micro-batch's attention on this rank: the window the context ring hides behind."""
    d = x.degrees
    if d.cp == 1:
        return 0.0
    scale, _, tp = _micro_batch(x, profile, spec)
    blocks = [profile.block_names[i] for i in x.sizes.block_positions]
    return sum(
        price.attention_s(part, scale, tp, d.cp)
        for n in blocks
        for part in (profile.forward.get(n), profile.backward.get(n))
        if part is not None
    )
