"""Checks that a model can be split the way a strategy asks, before any process starts."""

from __future__ import annotations

from experiments.config.schema import Config, ConfigError
from models import SP_MODELS, TP_MODELS, num_blocks, tp_split_sizes
from parallel.mesh import Degrees
from parallel.registry import StrategySpec
from parallel.strategies.pipeline import SCHEDULES, V_SCHEDULES, is_multi_stage, stages_per_rank


def check_plans(cfg: Config, degrees: Degrees, spec: StrategySpec) -> None:
    s, m = cfg.strategy, cfg.model
    if spec.needs_tp_plan:
        if m.name not in TP_MODELS:
            raise ConfigError(
                f"strategy={s.name} needs a tensor-parallel plan and model={m.name} has none; "
                f"models with one: {', '.join(TP_MODELS)}"
            )
        for what, size in tp_split_sizes(m):
            if size < degrees.tp and what == "model.kv_heads":
                raise ConfigError(
                    f"tp degree {degrees.tp} is more than {what} = {size}: each TP rank needs a kv head of "
                    f"its own; use tp <= {size}, or more kv heads"
                )
            if size % degrees.tp:
                raise ConfigError(f"tp degree {degrees.tp} does not divide {what} = {size}")
    if s.sequence_parallel:
        if m.name not in SP_MODELS or not spec.needs_tp_plan:
            raise ConfigError(
                f"strategy.sequence_parallel needs model={' or model='.join(SP_MODELS)} and a "
                "tensor-parallel strategy"
            )
        if degrees.pp > 1:
            raise ConfigError("strategy.sequence_parallel with pipeline stages is not supported; set pp=1")
        if cfg.dataset.seq_len % degrees.tp:
            raise ConfigError(
                f"tp degree {degrees.tp} does not divide dataset.seq_len = {cfg.dataset.seq_len}"
            )
    if spec.pipelined:
        _check_pipeline(cfg, degrees, spec)


def _check_pipeline(cfg: Config, degrees: Degrees, spec: StrategySpec) -> None:
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
    blocks = num_blocks(cfg.model)
    if stages > blocks:
        raise ConfigError(
            f"{stages} pipeline stages (pp={degrees.pp} × {v} per rank) but model={cfg.model.name} has {blocks} "
            "blocks; lower the pp degree or raise model.layers"
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
