"""The papers' formulas applied to one run, in the same categories the measurements use.

Two memory predictions are logged: `theory/paper_*` is the ZeRO paper's formula with this run's
sizes; `theory/*` is what torch's implementation of the strategy must hold, which differs from the
paper in three known, stated ways: FSDP2 in ZeRO-2 mode keeps each parameter's shard beside the
gathered copy (in the paper's mixed-precision accounting that shard is the fp32 master copy inside
K; its fp32 formula has no master copy), FSDP2 in ZeRO-3 mode keeps the root's own parameters
(stem, head) gathered from forward into backward, and ZeroRedundancyOptimizer assigns whole
parameters to ranks rather than an even split. Elsewhere the two agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from data.spec import DataSpec
from experiments.config.schema import Config
from models import HEADED, HIDDEN_WIDTH
from parallel.mesh import Degrees
from parallel.strategies.pipeline import stage_ids, stages_per_rank


@dataclass(frozen=True)
class ModelSizes:
    psi: int  # parameters of the whole model
    param_bytes: int  # bytes per parameter element (4 for fp32 weights)
    assigned_psi: int | None = None  # ZeRO-1: parameters whose optimizer state this rank owns
    # This rank's parameters as tensor parallelism leaves them (whole where there is no TP), and
    # how many blocks it holds: what FSDP shards and gathers, group by group.
    local_shapes: tuple[tuple[int, ...], ...] = ()
    blocks_here: int = 0
    # Those of local_shapes outside the blocks (stem, head, final norm): FSDP's root group.
    root_shapes: tuple[tuple[int, ...], ...] = ()
    # Whether this rank runs the model's stem and head (a pipeline's first and last stage do).
    stem_here: bool = True
    head_here: bool = True
    # Where this rank's blocks sit in the whole model (0, 1, ...): which ones train.ac_every picks.
    block_ids: tuple[int, ...] | None = None
    # Expert parallelism: this rank's expert weights (its ep share, left out of local_shapes), and
    # how many mixtures hold them (each its own FSDP group).
    expert_shapes: tuple[tuple[int, ...], ...] = ()
    expert_groups: int = 0

    @property
    def block_positions(self) -> tuple[int, ...]:
        return self.block_ids if self.block_ids is not None else tuple(range(self.blocks_here))

    @property
    def local_psi(self) -> int:
        return sum(math.prod(s) for s in self.local_shapes) if self.local_shapes else self.psi

    def padded_psi(self, n: int) -> int:
        """Elements FSDP2 moves: each local parameter's dim 0 padded up to a multiple of n ranks."""
        return padded(self.local_shapes, n) if self.local_shapes else self.psi

    def padded_root(self, n: int) -> int:
        return padded(self.root_shapes, n)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        psi: int,
        param_bytes: int,
        assigned_psi: int | None = None,
        block_order: list[str] | None = None,
    ) -> ModelSizes:
        """This rank's `model` (TP-sharded, a pipeline stage, or whole), group by group as FSDP
        shards it: its blocks, and the root's own parameters."""
        from parallel.layout import split_shapes, tp_local_shapes
        from parallel.strategies.expert import ExpertParallel

        mixtures = [m for m in model.modules() if isinstance(m, ExpertParallel)]
        in_experts = {id(p) for m in mixtures for p in m.parameters()}
        params = [p for p in model.parameters() if id(p) not in in_experts]
        blocks = getattr(model, "blocks", None)
        in_blocks = {id(p) for p in blocks.parameters()} if blocks is not None else set()
        return cls(
            psi,
            param_bytes,
            assigned_psi=assigned_psi,
            expert_shapes=split_shapes((p for m in mixtures for p in m.parameters()), "ep"),
            expert_groups=len(mixtures),
            local_shapes=tp_local_shapes(params),
            blocks_here=len(blocks) if blocks is not None else 0,
            root_shapes=tp_local_shapes(p for p in params if id(p) not in in_blocks),
            stem_here=getattr(model, "stem", None) is not None,
            block_ids=tuple(block_order.index(n) for n in blocks)
            if block_order is not None and blocks is not None
            else None,
            head_here=getattr(model, "head", None) is not None,
        )


def padded(shapes: tuple[tuple[int, ...], ...], n: int) -> int:
    return sum(math.ceil(s[0] / n) * n * math.prod(s[1:]) if s else n for s in shapes)


@dataclass(frozen=True)
class Setting:
    """One rank of one run, as the formulas see it."""

    cfg: Config
    degrees: Degrees
    sizes: ModelSizes
    local_batch: int  # samples per data-parallel rank per optimizer step
    seq_len: int
    pp_rank: int = 0
    data: DataSpec | None = None  # for the activation count


# (mesh axis, collective) -> (payload bytes S per step, group size, calls per step or None where
# not predicted); the whole result is None where the strategy has no prediction. The axis is the
# one the communication counter names for the group the collective runs on (Degrees.axis).
# Bytes None: the calls are known, the bytes are data's (an all-to-all's, by routing).
Payload = dict[tuple[str, str], tuple[float | None, int, int | None]]
CommTheory = Callable[[Setting], Payload | None]


def optimizer_state_bytes_per_param(cfg: Config) -> int:
    if cfg.train.optimizer == "adamw":
        return 8  # exp_avg + exp_avg_sq in fp32
    return 4 if cfg.train.momentum else 0


# (ZeRO stage, setting) -> bytes per category on this rank: what an implementation holds.
MemoryModel = Callable[[str, Setting], dict[str, float]]


def torch_memory(stage: str, x: Setting) -> dict[str, float]:
    """What torch's DDP, ZeroRedundancyOptimizer and FSDP2 hold."""
    m, b = x.sizes, x.sizes.param_bytes
    # ZeRO-1 splits over every data-parallel rank; FSDP over its shard group (HSDP: within a
    # replica group) and the context-parallel ranks.
    n = x.degrees.dp if stage in ("dp", "os") else x.degrees.fsdp
    k = optimizer_state_bytes_per_param(x.cfg)
    psi = m.psi
    if stage == "dp":
        return {"params": b * psi, "params_gathered": 0.0, "grads": b * psi, "optim": k * psi}
    if stage == "os":
        owned = psi if m.assigned_psi is None else m.assigned_psi
        return {"params": b * psi, "params_gathered": 0.0, "grads": b * psi, "optim": k * owned}
    # ZeRO-2 holds every gathered parameter from forward into backward; ZeRO-3 only the root's
    # own (FSDP2 keeps them for the backward that starts with them). Gathered copies live in
    # FSDP2's padded all-gather buffers.
    gathered = m.padded_psi(n) if stage == "os+g" else m.padded_root(n)
    if stage == "os+g" and m.expert_groups:  # its own experts, gathered over dp_shard / ep (× cp)
        gathered += padded(m.expert_shapes, x.degrees.experts_fsdp)
    return {
        "params": b * psi / n,
        "params_gathered": b * gathered,
        "grads": b * psi / n,
        "optim": k * psi / n,
    }


def deepspeed_memory(stage: str, x: Setting) -> dict[str, float]:
    """What DeepSpeed 0.19's ZeRO holds (measured, and read from its stage_1_and_2.py / stage3.py).

    Its optimizer steps an fp32 master copy of this rank's partition even when training in fp32:
    the ZeRO paper's mixed-precision K counts that copy, its fp32 formula does not, so DeepSpeed
    holds b·Ψ/N more optimizer state than the paper's fp32 formula. Stages 1 and 2 keep whole
    parameters; stage 1 (its reduction waits for the step) whole gradients. Stage 3 gathers every
    parameter for forward and keeps them into backward: one gathered copy, as FSDP2's ZeRO-2.
    Stage 2's gradient buckets add a rank-dependent remainder to its gradient partition.
    """
    n, psi, b = x.degrees.dp, x.sizes.psi, x.sizes.param_bytes
    k = optimizer_state_bytes_per_param(x.cfg)
    whole_params = stage in ("os", "os+g")
    return {
        "params": b * psi if whole_params else b * psi / n,
        "params_gathered": 0.0 if whole_params else b * psi,
        "grads": b * psi if stage == "os" else b * psi / n,
        "optim": (k + b) * psi / n,
    }


def no_comm(x: Setting) -> Payload:
    return {}


def ddp_comm(x: Setting) -> Payload:
    # Every gradient of this rank's parameters once per step: no_sync keeps the inner micro-steps
    # local. Calls are the buckets; predicted where the gradient fits in one.
    size = x.sizes.param_bytes * x.sizes.local_psi
    one_bucket = size <= x.cfg.strategy.bucket_cap_mb * 2**20
    d = x.degrees
    return {(d.axis("dp_replicate"), "all_reduce"): (size, d.dp, 1 if one_bucket else None)}


def zero1_comm(x: Setting) -> Payload:
    # DDP's all-reduce, then each updated parameter broadcast from the rank that owns its state.
    params = len(x.sizes.local_shapes) or None
    d = x.degrees
    broadcast = (x.sizes.param_bytes * x.sizes.psi, d.dp, params)
    return {**ddp_comm(x), (d.axis("dp_replicate"), "broadcast"): broadcast}


def fsdp_axis(d: Degrees) -> str:
    return d.axis("dp_shard", "cp") if d.cp > 1 else d.axis("dp_shard")


def fsdp_comm(x: Setting) -> Payload:
    # Forward gathers every parameter on each micro-step; ZeRO-3 gathers the blocks again for
    # backward (ZeRO §7), but not the root's own parameters, which stay gathered into the backward
    # that starts with them. Gradients are reduce-scattered once per step. One collective per FSDP
    # group (each block, and the root); FSDP2 pads each local dim 0 to the group size. The
    # context-parallel ranks shard the parameters with the shard group (they hold the same ones).
    d, m = x.degrees, x.sizes
    n, b, a = d.fsdp, m.param_bytes, x.cfg.train.grad_accum_steps
    total, root = m.padded_psi(n), m.padded_root(n)
    gathers = 2 if x.cfg.strategy.reshard_after_forward else 1
    groups = m.blocks_here + 1
    axis = fsdp_axis(d)
    gathered = b * a * (gathers * (total - root) + root)
    out: Payload = {
        (axis, "all_gather"): (gathered, n, a * (gathers * (groups - 1) + 1)),
        (axis, "reduce_scatter"): (b * total, n, groups),
    }
    return out | experts_comm(x, gathers) | replicas_comm(x)


def experts_comm(x: Setting, gathers: int) -> Payload:
    """Expert parallelism (parallel/strategies/expert.py): each mixture's experts are an FSDP group
    of their own over dp_shard / ep (and cp), gathered like a block; tokens go out and back by
    all-to-all, 3 forward (counts, tokens out, outputs back) and 2 backward per mixture. How many
    tokens go where is the router's choice: the all-to-all's bytes are not predicted."""
    d, m, a = x.degrees, x.sizes, x.cfg.train.grad_accum_steps
    if not m.expert_groups:
        return {}
    out: Payload = {(d.axis("ep"), "all_to_all"): (None, d.ep, a * 5 * m.expert_groups)}
    n = d.experts_fsdp
    total, b, groups = padded(m.expert_shapes, n), m.param_bytes, m.expert_groups
    if n > 1:  # FSDP2 sends nothing over a group of one
        axis = d.axis("dp_shard_mod_ep", "cp") if d.cp > 1 else d.axis("dp_shard_mod_ep")
        out[(axis, "all_gather")] = (b * a * gathers * total, n, a * gathers * groups)
        out[(axis, "reduce_scatter")] = (b * total, n, groups)
    return out


def replicas_comm(x: Setting) -> Payload:
    """HSDP: after FSDP's reduce-scatter within each replica group, each rank's reduced gradient
    shard is all-reduced with the same shard of the other groups, once per FSDP group per step."""
    d, m = x.degrees, x.sizes
    if d.dp_replicate == 1:
        return {}
    n, b = d.fsdp, m.param_bytes
    shards = b * m.padded_psi(n) / n
    calls = m.blocks_here + 1
    if m.expert_groups:
        shards += b * padded(m.expert_shapes, d.experts_fsdp) / d.experts_fsdp
        calls += m.expert_groups
    return {(d.axis("dp_replicate"), "all_reduce"): (shards, d.dp_replicate, calls)}


def tp_comm(x: Setting) -> Payload | None:
    # Megatron: one all-reduce per column→row pair forward and one backward; a transformer layer
    # has two pairs (attention, MLP), the MLP block one.
    cfg = x.cfg
    if cfg.strategy.sequence_parallel:
        return None
    if cfg.model.target not in HIDDEN_WIDTH:
        return None
    h, a = cfg.model.get("hidden"), cfg.train.grad_accum_steps
    transformer = x.seq_len > 0
    pairs = 2 if transformer else 1
    layers = x.sizes.blocks_here
    # Under context parallelism each rank holds 1/cp of every sequence.
    tokens = x.local_batch * (x.seq_len // x.degrees.cp if transformer else 1) // a
    size = 4 * a * 2 * pairs * layers * tokens * h
    return {(x.degrees.axis("tp"), "all_reduce"): (size, x.degrees.tp, a * 2 * pairs * layers)}


def fsdp_tp_comm(x: Setting) -> Payload | None:
    tp, cp = tp_comm(x), cp_comm(x)
    return None if tp is None or cp is None else {**fsdp_comm(x), **tp, **cp}


def fsdp_cp_comm(x: Setting) -> Payload | None:
    cp = cp_comm(x)
    return None if cp is None else {**fsdp_comm(x), **cp}


def cp_comm(x: Setting) -> Payload | None:
    """Ring attention (parallel/strategies/context.py), per attention layer and micro-step: forward
    passes its K/V block on cp − 1 times; backward passes it on cp − 1 times more, and the K/V
    gradients cp times, home at the end. One send (and one recv) per hop, K and V packed."""
    d, cfg = x.degrees, x.cfg
    if d.cp == 1:
        return {}
    if cfg.train.precision != "fp32" or cfg.train.ac != "none" or cfg.model.target not in HEADED:
        return None  # bf16 grads are kept in fp32; recompute runs the forward ring again
    heads = cfg.model.get("heads")
    kv = (cfg.model.get("kv_heads") or heads) if cfg.model.target == "models.llama.Llama" else heads
    head_dim = cfg.model.get("hidden") // heads
    a = cfg.train.grad_accum_steps
    block = 4 * 2 * (x.local_batch // a) * kv // d.tp * (x.seq_len // d.cp) * head_dim
    hops = a * x.sizes.blocks_here * (2 * (d.cp - 1) + d.cp)
    each = (hops * block, 2, hops)
    out: Payload = {(d.axis("cp"), "send"): each, (d.axis("cp"), "recv"): each}
    experts = cfg.model.get("experts", 0)
    if experts:
        # A mixture's load statistics over the whole sequence: (2, batch, experts) in fp32 summed
        # over the ring's ranks, forward and (its gradient) backward.
        size = 4 * 2 * (x.local_batch // a) * experts
        out[(d.axis("cp"), "all_reduce")] = (
            2 * a * x.sizes.blocks_here * size,
            d.cp,
            2 * a * x.sizes.blocks_here,
        )
    return out


def _boundary_features(cfg: Config, seq_len: int) -> int | None:
    """Elements per sample that cross a stage boundary (the blocks' output), where it is one shape."""
    if cfg.model.target not in HIDDEN_WIDTH:
        return None
    return cfg.model.get("hidden") * max(seq_len, 1)


def pp_comm(x: Setting) -> Payload | None:
    """Activations forward and their gradients back, at each boundary between two ranks' stages."""
    cfg, pp = x.cfg, x.degrees.pp
    features = _boundary_features(cfg, x.seq_len)
    if features is None or cfg.train.precision != "fp32":
        return None
    s = cfg.strategy
    v = stages_per_rank(s.schedule, s.stages_per_rank)
    owner = {sid: r for r in range(pp) for sid in stage_ids(r, pp, v, s.schedule)}
    n_micro = s.microbatches * cfg.train.grad_accum_steps
    per_micro = x.local_batch // n_micro * features * 4
    boundaries = 0
    for i in range(pp * v - 1):
        a, b = owner[i], owner[i + 1]
        if a != b and x.pp_rank in (a, b):  # two stages on one rank hand over in memory
            boundaries += 1  # forward one way, backward the other
    if not boundaries:
        return {}
    each = (boundaries * n_micro * per_micro, 2, boundaries * n_micro)
    axis = x.degrees.axis("pp")
    return {(axis, "send"): each, (axis, "recv"): each}


def deepspeed_comm(x: Setting) -> Payload | None:
    """DeepSpeed's ZeRO, as measured with its fp32 defaults and one micro-step per step.

    Stages 1 and 2 all-reduce the whole gradient (in buckets), then all-gather the updated
    partitions of the flat parameter buffer (padded to a multiple of 2N elements); the gradient
    norm is one more fp32 all-reduce. Stage 3 gathers the parameters once (coalesced) for forward,
    reduce-scatters the gradients once, and reduces the norm in fp64.
    """
    n, b, psi = x.degrees.dp, x.sizes.param_bytes, x.sizes.psi
    if n == 1 or x.cfg.train.grad_accum_steps != 1 or x.cfg.train.precision != "fp32":
        return None
    axis = x.degrees.axis("dp_replicate")
    if x.cfg.strategy.zero_stage == 3:
        padded = math.ceil(psi / n) * n
        return {
            (axis, "all_gather"): (b * padded, n, None),
            (axis, "reduce_scatter"): (b * padded, n, None),
            (axis, "all_reduce"): (8, n, 1),
        }
    padded = math.ceil(psi / (2 * n)) * 2 * n
    return {(axis, "all_reduce"): (b * psi + 4, n, None), (axis, "all_gather"): (b * padded, n, 1)}


def ddp_pp_comm(x: Setting) -> Payload | None:
    pp = pp_comm(x)
    return None if pp is None else {**pp, **ddp_comm(x)}
