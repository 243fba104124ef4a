"""What one rank of a configuration holds, derived from a model profile without building it: the
`Setting` the cost models of parallel/costs.py read, as setup measures it on the real sharded model
(tests/test_plan.py checks the two agree)."""

from __future__ import annotations

import math

from data.spec import DataSpec
from experiments.config.schema import Config
from experiments.plan.profile import ModelProfile
from parallel.costs import ModelSizes, Setting
from parallel.mesh import Degrees
from parallel.registry import StrategySpec
from parallel.strategies.pipeline import rank_blocks


def zero1_largest_share(numels: list[int], ranks: int) -> int:
    """Parameters whose optimizer state the fullest rank owns: ZeroRedundancyOptimizer assigns whole
    parameters, largest first, each to the rank holding the fewest so far (its
    _partition_parameters; one parameter group, as parallel/strategies/zero.py builds it)."""
    held = [0] * ranks
    for n in sorted(numels, reverse=True):
        held[held.index(min(held))] += n
    return max(held)


def param_bytes(cfg: Config) -> int:
    return 8 if cfg.train.precision == "fp64" else 4  # bf16 autocasts; parameters stay fp32


def placement(profile: ModelProfile, cfg: Config, degrees: Degrees, spec: StrategySpec, pp_rank: int):
    """(positions of the blocks this pipeline rank holds, whether it holds the stem, the head)."""
    n = len(profile.block_names)
    if not spec.pipelined:
        return list(range(n)), True, True
    s = cfg.strategy
    return rank_blocks(n, degrees.pp, pp_rank, s.schedule, s.stages_per_rank)


def rank_sizes(
    profile: ModelProfile, cfg: Config, degrees: Degrees, spec: StrategySpec, pp_rank: int = 0
) -> ModelSizes:
    positions, stem, head = placement(profile, cfg, degrees, spec, pp_rank)
    tp = degrees.tp if spec.needs_tp_plan else 1
    names = profile.block_names
    local: list[tuple[int, ...]] = []
    root: list[tuple[int, ...]] = []
    experts: list[tuple[int, ...]] = []
    mixtures = 0
    for part in [*(["stem"] if stem else []), *(names[i] for i in positions), *(["head"] if head else [])]:
        block = part not in ("stem", "head")
        has_experts = False
        for name, shape in profile.params[part]:
            split = list(shape)
            if block and degrees.ep > 1 and name in profile.expert_params:
                split[0] //= degrees.ep
                experts.append(tuple(split))
                has_experts = True
                continue
            if block and tp > 1 and name in profile.tp_split:
                split[profile.tp_split[name]] //= tp
            local.append(tuple(split))
            if not block:
                root.append(tuple(split))
        mixtures += has_experts
    # psi: what this pipeline/TP rank holds before data parallelism shards it; the experts whole,
    # as ep × the experts' FSDP degree is the FSDP degree (parallel/mesh.py).
    numels = [math.prod(s) for s in local]
    psi = sum(numels) + sum(math.prod(s) for s in experts) * degrees.ep
    stage = spec.zero_stage(cfg.strategy)
    return ModelSizes(
        psi,
        param_bytes(cfg),
        assigned_psi=zero1_largest_share(numels, degrees.dp) if stage == "os" else None,
        local_shapes=tuple(local),
        blocks_here=len(positions),
        root_shapes=tuple(root),
        stem_here=stem,
        head_here=head,
        block_ids=tuple(positions),
        expert_shapes=tuple(experts),
        expert_groups=mixtures,
    )


def rank_setting(
    profile: ModelProfile, cfg: Config, degrees: Degrees, spec: StrategySpec, data: DataSpec, pp_rank: int = 0
) -> Setting:
    sizes = rank_sizes(profile, cfg, degrees, spec, pp_rank)
    return Setting(
        cfg, degrees, sizes, cfg.train.global_batch_size // degrees.dp, data.seq_len, pp_rank, data
    )
