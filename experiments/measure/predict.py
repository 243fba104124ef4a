"""The papers' formulas and each strategy's cost model (parallel/costs.py), applied to one rank of
one run, as the `theory/*` tags logged beside the measurements."""

from __future__ import annotations

from experiments.measure.activation_theory import predicted_activation_bytes
from experiments.measure.record import Tag
from experiments.measure.theory import (
    Precision,
    bubble_relative_to_ideal,
    bubble_share_of_total,
    ring_bytes,
    zero_model_state_bytes,
)
from parallel.costs import CommTheory, MemoryModel, Setting, optimizer_state_bytes_per_param, torch_memory
from parallel.mesh import WORLD
from parallel.strategies.pipeline import stages_per_rank


def memory(
    stage: str | None, x: Setting, model: MemoryModel = torch_memory, zero_ranks: int | None = None
) -> dict[str, float]:
    """The implementation's model state (`model`) and the paper's, as theory tags; {} where not
    predicted (no ZeRO stage, or tensor/pipeline parallelism: a share depends on the plan).
    `zero_ranks`: the N the paper divides by (HSDP: its shard group); every data rank if None."""
    d = x.degrees
    if stage is None or d.tp * d.pp > 1:
        return {}
    cats = model(stage, x)
    b, k = x.sizes.param_bytes, optimizer_state_bytes_per_param(x.cfg)
    out = {Tag.theory_mem(c): v for c, v in cats.items()}
    out[Tag.THEORY_MODEL_STATE] = sum(cats.values())
    out[Tag.THEORY_PAPER_MODEL_STATE] = zero_model_state_bytes(
        stage, x.sizes.psi, zero_ranks or d.dp, Precision(b, b, k)
    )
    return out


def communication(theory: CommTheory | None, x: Setting) -> dict[str, float]:
    """Payload bytes S per collective per step, the ring bytes this rank sends for them, and the
    calls: per mesh axis, and summed over the axes."""
    payload = theory(x) if theory is not None else None
    if payload is None:
        return {}
    d = x.degrees
    if x.cfg.train.grad_clip > 0 and d.world_size > 1:
        # Clipping needs the global norm every step: one fp32 scalar, summed over the world.
        key = (WORLD, "all_reduce")
        size, _, calls = payload.get(key, (0.0, d.world_size, 0))
        payload = {**payload, key: (size + 4, d.world_size, None if calls is None else calls + 1)}
    out: dict[str, float] = {}
    unknown: set[str] = set()  # a tag one of whose parts is not predicted is not predicted
    for (axis, coll), (size, n, calls) in payload.items():
        for tag_coll in (f"axis/{axis}/{coll}", coll):
            parts = [("calls", calls), ("bytes", size)]
            parts.append(("wire_bytes", None if size is None else ring_bytes(coll, size, n)))
            for what, value in parts:
                tag = Tag.theory_comm(tag_coll, what)
                if value is None:
                    unknown.add(tag)
                else:
                    out[tag] = out.get(tag, 0.0) + value
    return {k: v for k, v in out.items() if k not in unknown}


def bubble(x: Setting) -> dict[str, float]:
    s = x.cfg.strategy
    if s.schedule not in ("gpipe", "1f1b", "interleaved1f1b"):
        return {}
    v = stages_per_rank(s.schedule, s.stages_per_rank)
    m = s.microbatches * x.cfg.train.grad_accum_steps
    return {
        Tag.THEORY_BUBBLE: bubble_share_of_total(x.degrees.pp, m, v),
        Tag.THEORY_BUBBLE_RELATIVE: bubble_relative_to_ideal(x.degrees.pp, m, v),
    }


def activations(x: Setting) -> dict[str, float]:
    """What autograd keeps for backward in one micro-step on this rank, where the model's count is known."""
    if x.data is None or x.degrees.ep > 1:
        return {}  # expert parallelism keeps its dispatch buffers too: not derived
    t = x.cfg.train
    bytes_ = predicted_activation_bytes(
        x.cfg,
        x.data,
        x.local_batch / t.grad_accum_steps,
        x.sizes.block_positions,
        x.sizes.stem_here,
        x.sizes.head_here,
        x.degrees.tp,
        x.degrees.cp,
    )
    return {} if bytes_ is None else {Tag.THEORY_ACTIVATIONS: bytes_}


def predict(spec, x: Setting) -> dict[str, float]:
    """Every prediction for one rank of a run, from its strategy's registry entry."""
    return {
        **memory(spec.zero_stage(x.cfg.strategy), x, spec.memory, spec.zero_ranks(x.degrees)),
        **activations(x),
        **communication(spec.comm, x),
        **(bubble(x) if spec.pipelined else {}),
    }
