"""Every configuration paralab can run for one model on one cluster: strategies × degrees ×
pipeline schedules and microbatches × activation checkpointing, each checked by the same rules
that refuse a bad config before launch (experiments/run/validate.py's pure checks)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from torch import nn

from experiments.config.schema import AC, Config, ConfigError
from models.attention import has_attention
from models.moe import GroupedExperts
from models.staged import blocks_of, tp_plan_of
from parallel.levers import check_levers
from parallel.mesh import Degrees
from parallel.plans import check_plans
from parallel.registry import get_spec, resolve_degrees
from parallel.strategies.pipeline import stages_per_rank

# Pipeline schedules the advisor weighs (each with its default stages per rank).
SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "interleaved_zb", "zbv")


def _powers_of_two(n: int) -> list[int]:
    return [2**i for i in range(n.bit_length()) if n % 2**i == 0]


def _strategies(world: int, per_node: int, model: nn.Module) -> Iterator[dict[str, object]]:
    """Strategy fields (name and degrees) to weigh on `world` ranks."""
    if world == 1:
        yield {"name": "single"}
    ways = [w for w in _powers_of_two(world) if w > 1]
    tp_ways = [w for w in ways if w <= per_node]  # TP's all-reduces every layer: inside a node
    yield {"name": "ddp"}
    yield {"name": "zero1"}
    yield {"name": "zero2"}
    yield {"name": "zero3"}
    for stage in (1, 2, 3):
        yield {"name": "deepspeed", "zero_stage": stage}
    for r in ways:
        if r < world:
            yield {"name": "hsdp", "dp_replicate": r}
    attention = has_attention(model)
    experts = next((m.count for m in model.modules() if isinstance(m, GroupedExperts)), 0)
    for cp in ways if attention else []:
        yield {"name": "fsdp", "cp": cp}
    for ep in ways if experts else []:
        if experts % ep == 0:
            yield {"name": "fsdp", "ep": ep}
    if tp_plan_of(model) is not None:
        # Sequence parallelism where the model has its edges (models/tp.py): the norms' activations
        # split too, the all-reduces become reduce-scatter + all-gather.
        sps = [{}, {"sequence_parallel": True}] if hasattr(model, "sequence_parallel_edges") else [{}]
        for sp in sps:
            if world <= per_node:
                yield {"name": "tp", **sp}
            for tp in tp_ways:
                if tp < world:
                    yield {"name": "fsdp_tp", "tp": tp, **sp}
                    for cp in ways if attention else []:
                        if tp * cp < world:
                            yield {"name": "fsdp_tp", "tp": tp, "cp": cp, **sp}
    blocks = blocks_of(model)
    if blocks is None:
        return
    for pp in ways:
        if pp > len(blocks):
            continue
        for schedule in SCHEDULES:
            for m in (pp, 2 * pp, 4 * pp, 8 * pp):
                pipe = {
                    "schedule": schedule,
                    "microbatches": m,
                    "stages_per_rank": stages_per_rank(schedule, 0),
                }
                if pp == world:
                    yield {"name": "pp", "pp": pp, **pipe}
                else:
                    yield {"name": "ddp_pp", "pp": pp, **pipe}
                    for tp in tp_ways if tp_plan_of(model) is not None else []:
                        if pp * tp <= world:
                            yield {"name": "fsdp_tp_pp", "pp": pp, "tp": tp, **pipe}
        if pp == world:
            yield {"name": "mp", "pp": pp, "schedule": "gpipe", "microbatches": 1}


def _label(fields: dict[str, object], ac: AC) -> list[str]:
    out = [f"strategy={fields['name']}"]
    out += [
        f"strategy.{k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in fields.items()
        if k != "name"
    ]
    return out + ([f"train.ac={ac}"] if ac != AC.none else [])


def candidates(
    cfg: Config, world: int, per_node: int, model: nn.Module
) -> Iterator[tuple[Config, Degrees, list[str]]]:
    """(config, its degrees, the overrides that make it) for each runnable configuration."""
    acs = [AC.none, AC.full, AC.selective] if blocks_of(model) is not None else [AC.none]
    for fields in _strategies(world, per_node, model):
        name = str(fields["name"])
        spec = get_spec(name)
        base = dataclasses.replace(
            cfg.strategy,
            **fields,
            reshard_after_forward=spec.fixed_reshard if spec.fixed_reshard is not None else True,
            **({} if "pp" in fields else {"schedule": "gpipe", "microbatches": 4, "stages_per_rank": 1}),
        )
        for ac in acs:
            c = dataclasses.replace(
                cfg, strategy=base, train=dataclasses.replace(cfg.train, ac=ac, ac_every=1, compile=False)
            )
            try:
                degrees = resolve_degrees(c.strategy, world)
                per_step = c.train.grad_accum_steps * degrees.dp
                if c.train.global_batch_size % per_step:
                    continue
                check_plans(c, degrees, spec, model)
                check_levers(c, model, spec.no_compile, spec.pipelined)
            except ConfigError:
                continue
            yield c, degrees, [*_label({k: v for k, v in fields.items() if k != "stages_per_rank"}, ac)]
