"""Checks that a model can be split the way a strategy asks, before any process starts."""

from __future__ import annotations

from torch import nn

from experiments.config.schema import Config, ConfigError
from models.attention import has_attention
from models.moe import GroupedExperts
from models.staged import StagedModel, aux_loss_of, blocks_of, tp_plan_of
from parallel.mesh import Degrees
from parallel.registry import StrategySpec
from parallel.strategies.pipeline import SCHEDULES, V_SCHEDULES, is_multi_stage, stages_per_rank


def check_plans(cfg: Config, degrees: Degrees, spec: StrategySpec, model: nn.Module) -> None:
    """`model`: built on the meta device; what it declares (models/staged.py) is what it offers."""
    s, name = cfg.strategy, cfg.model.label
    drops = spec.drops_aux_loss or (
        "a pipeline computes the loss on its last stage, without the other stages' routers"
        if spec.pipelined
        else ""
    )
    if drops and aux_loss_of(model) is not None:
        raise ConfigError(
            f"strategy={s.name} cannot add model={name}'s auxiliary loss to the loss it trains on "
            f"({drops}); use ddp, fsdp, zero1|2|3 or deepspeed"
        )
    if spec.needs_tp_plan:
        if tp_plan_of(model) is None:
            raise ConfigError(
                f"strategy={s.name} needs a TP plan; model={name} declares none (blocks and tp_plan, "
                "docs/models.md); models with one: mlp, transformer, llama"
            )
        for what, size in model.tp_divisors():  # type: ignore[operator]
            if size < degrees.tp and what == "model.kv_heads":
                raise ConfigError(
                    f"tp degree {degrees.tp} is more than {what} = {size}: each TP rank needs a kv head of "
                    f"its own; use tp <= {size}, or more kv heads"
                )
            if size % degrees.tp:
                raise ConfigError(f"tp degree {degrees.tp} does not divide {what} = {size}")
    if s.sequence_parallel:
        if not hasattr(model, "sequence_parallel_edges") or not spec.needs_tp_plan:
            raise ConfigError(
                f"strategy.sequence_parallel needs a tensor-parallel strategy and a model with sequence-"
                f"parallel edges (transformer, llama); model={name} has none"
            )
        if degrees.pp > 1:
            raise ConfigError("strategy.sequence_parallel with pipeline stages is not supported; set pp=1")
        if cfg.dataset.seq_len % degrees.tp:
            raise ConfigError(
                f"tp degree {degrees.tp} does not divide dataset.seq_len = {cfg.dataset.seq_len}"
            )
    if spec.pipelined:
        _check_pipeline(cfg, degrees, spec, model)
    _check_axes(cfg, degrees, model)


def _check_axes(cfg: Config, degrees: Degrees, model: nn.Module) -> None:
    """Context parallelism needs attention to ring and sequences to cut head-tail; expert
    parallelism needs experts to split evenly."""
    name = cfg.model.label
    if degrees.cp > 1:
        if not has_attention(model):
            raise ConfigError(
                f"strategy.cp={degrees.cp} splits sequences for attention, but model={name} has none "
                "(no models.attention.CausalAttention); use a decoder: model=transformer|llama|moe"
            )
        if cfg.dataset.seq_len % (2 * degrees.cp):
            raise ConfigError(
                f"strategy.cp={degrees.cp} cuts each sequence into 2·cp = {2 * degrees.cp} chunks (a head "
                f"and a tail per rank), which dataset.seq_len={cfg.dataset.seq_len} does not divide"
            )
        if cfg.train.compile:
            raise ConfigError(
                "train.compile with strategy.cp > 1 is not supported: the ring's point-to-point sends "
                "break the compiled graph every step; drop one of them"
            )
    if degrees.ep > 1:
        experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
        if not experts:
            raise ConfigError(
                f"strategy.ep={degrees.ep} splits a mixture's experts, but model={name} has none; "
                "use model=moe (or drop strategy.ep)"
            )
        if experts[0].count % degrees.ep:
            raise ConfigError(
                f"strategy.ep={degrees.ep} does not divide model.experts={experts[0].count}: each ep rank "
                "holds the same number of experts"
            )


def _check_pipeline(cfg: Config, degrees: Degrees, spec: StrategySpec, model: nn.Module) -> None:
    s, t = cfg.strategy, cfg.train
    if s.schedule not in SCHEDULES:
        raise ConfigError(f"strategy.schedule={s.schedule} is not one of: {', '.join(SCHEDULES)}")
    if spec.one_batch and (s.microbatches != 1 or s.schedule != "gpipe"):
        raise ConfigError(
            f"strategy={s.name} runs one whole batch at a time (gpipe, 1 microbatch); for microbatches use strategy=pp"
        )
    v = stages_per_rank(s.schedule, s.stages_per_rank)
    multi = is_multi_stage(s.schedule)
    if multi and v < 2:
        raise ConfigError(
            f"strategy.schedule={s.schedule} needs strategy.stages_per_rank >= 2 (or 0 for auto)"
        )
    if not multi and v != 1:
        raise ConfigError(
            f"strategy.schedule={s.schedule} runs one stage per rank; set strategy.stages_per_rank=1"
        )
    if s.schedule in V_SCHEDULES and v != 2:
        raise ConfigError(f"strategy.schedule={s.schedule} places exactly 2 stages per rank")
    stages = degrees.pp * v
    blocks = blocks_of(model)
    if not isinstance(model, StagedModel) or blocks is None:
        raise ConfigError(
            f"strategy={s.name} needs a sequence of blocks to cut into stages; model={cfg.model.label} "
            "is not one (a StagedModel: stem, blocks, head; docs/models.md)"
        )
    if stages > len(blocks):
        raise ConfigError(
            f"{stages} pipeline stages (pp={degrees.pp} × {v} per rank) but model={cfg.model.label} has "
            f"{len(blocks)} blocks; lower the pp degree or raise model.layers"
        )
    if s.microbatches < 1:
        raise ConfigError(f"strategy.microbatches={s.microbatches} must be >= 1")
    local = t.global_batch_size // (t.grad_accum_steps * degrees.dp)
    if local % s.microbatches:
        raise ConfigError(
            f"the per-rank batch of each micro-step ({local} = global_batch_size / (grad_accum_steps × dp)) "
            f"does not split into strategy.microbatches={s.microbatches}"
        )
    n_micro = s.microbatches * t.grad_accum_steps
    if s.schedule == "1f1b" and n_micro < degrees.pp:
        raise ConfigError(
            f"strategy.schedule=1f1b needs at least as many microbatches as stages: "
            f"microbatches × grad_accum_steps = {n_micro} < pp = {degrees.pp}; raise strategy.microbatches "
            "or use strategy.schedule=gpipe"
        )
    if multi and n_micro % degrees.pp:
        raise ConfigError(
            f"strategy.schedule={s.schedule} needs microbatches × grad_accum_steps ({n_micro}) divisible by pp={degrees.pp}"
        )
