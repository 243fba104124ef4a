"""Every strategy by name: its apply_* function, how it uses the mesh, and its traits.

A strategy is one file with an apply_* function plus one entry here. Nothing else in paralab
branches on a strategy's name: validation, the theory and the report read these traits.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from experiments.config.schema import Config, ConfigError, StrategyConfig
from parallel.costs import (
    CommTheory,
    MemoryModel,
    ddp_comm,
    ddp_pp_comm,
    deepspeed_comm,
    deepspeed_memory,
    fsdp_cp_comm,
    fsdp_tp_comm,
    no_comm,
    pp_comm,
    torch_memory,
    tp_comm,
    zero1_comm,
)
from parallel.mesh import Degrees
from parallel.strategies.dataparallel import apply_dp
from parallel.strategies.ddp import apply_ddp
from parallel.strategies.deepspeed import DeepSpeedEngine, apply_deepspeed
from parallel.strategies.deepspeed import check as check_deepspeed
from parallel.strategies.pipeline import apply_pipeline
from parallel.strategies.ps import apply_ps
from parallel.strategies.ps import check as check_ps
from parallel.strategies.single import apply_single


def lazy(path: str) -> Callable:
    """The function at "module:name", imported at its first call. FSDP, DTensor and ZeRO-1's
    optimizer cost ~0.5 s of CPU to import; `python train.py` validates and launches without them,
    and only the ranks that apply such a strategy import it (tests/test_layers.py reads these
    strings as imports)."""
    module, _, name = path.partition(":")

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = name
    return call


apply_fsdp = lazy("parallel.strategies.fsdp:apply_fsdp")
apply_tp = lazy("parallel.strategies.tensor:apply_tp")
apply_zero1 = lazy("parallel.strategies.zero:apply_zero1")
apply_fsdp_tp = lazy("parallel.strategies.hybrid:apply_fsdp_tp")
apply_ddp_pp = lazy("parallel.strategies.hybrid:apply_ddp_pp")
apply_fsdp_tp_pp = lazy("parallel.strategies.hybrid:apply_fsdp_tp_pp")

# The one strategy every other is checked against.
REFERENCE = "single"


@dataclass(frozen=True)
class StrategySpec:
    apply: Callable  # apply_x(model, mesh, ctx) -> Parallelized
    # Mesh dim that takes the world size left after the configured degrees; None = one process only.
    fill: str | None
    # Degrees read from strategy.tp / pp / dp_replicate / cp / ep; the fill dim takes the rest.
    configured: frozenset[str] = frozenset()
    needs_tp_plan: bool = False
    pipelined: bool = False
    # One whole batch per step through the stages (the naive layer split): no microbatches.
    one_batch: bool = False
    # ZeRO stage of its model-state memory ("dp", "os", "os+g", "os+g+p"), or the function of its
    # config that picks one; None = no ZeRO accounting.
    stage: str | Callable[[StrategyConfig], str | None] | None = None
    # zero2/zero3 are FSDP with reshard_after_forward fixed.
    fixed_reshard: bool | None = None
    comm: CommTheory | None = None  # its collectives per step; None = not predicted
    shards: str = ""  # for the README table and --help
    # What its implementation holds at each ZeRO stage (parallel/costs.py).
    memory: MemoryModel = torch_memory
    # Strategy keys it reads that its other traits do not imply (experiments/run/keys.py).
    reads: frozenset[str] = frozenset()
    # Its name in records and reports where a key picks a variant (DeepSpeed's stage).
    # Why train.compile cannot run under it (refused before launch); None where it can.
    no_compile: str | None = None
    label: Callable[[StrategyConfig], str] | None = None
    # Its own rules, checked with the others before any process starts (raises ConfigError).
    check: Callable[[Config], None] | None = None
    # Trains through DistributedDataParallel (reads strategy.bucket_cap_mb, gradient_as_bucket_view).
    wraps_ddp: bool = False
    # model.norm=sync_batch means BatchNorm statistics over all of its data-parallel ranks.
    syncs_batchnorm: bool = False
    # Loads a checkpoint (train.resume): refused before launch where not. Saving always works.
    resumable: bool = True
    # Why it cannot add a model's auxiliary loss (a mixture of experts') to the loss; "" = it can.
    drops_aux_loss: str = ""

    def record_name(self, s: StrategyConfig) -> str:
        return self.label(s) if self.label is not None else s.name

    def zero_ranks(self, d: Degrees) -> int:
        """The ranks its ZeRO stage divides model state over: FSDP's shard group (with the
        context-parallel ranks), else every data rank."""
        return d.fsdp if self.fill == "dp_shard" else d.dp

    def zero_stage(self, s: StrategyConfig) -> str | None:
        return self.stage(s) if callable(self.stage) else self.stage


def fsdp_stage(s: StrategyConfig) -> str:
    return "os+g+p" if s.reshard_after_forward else "os+g"


def deepspeed_stage(s: StrategyConfig) -> str | None:
    return {1: "os", 2: "os+g", 3: "os+g+p"}.get(s.zero_stage)


TP = frozenset({"tp"})
PP = frozenset({"pp"})
# Context and expert parallelism compose with FSDP2's sharding (the FSDP family): the cp ranks
# shard parameters with dp_shard, and the ep ranks are dp_shard's (parallel/mesh.py).
CP_EP = frozenset({"cp", "ep"})
_FSDP = dict(fill="dp_shard", configured=CP_EP, stage=fsdp_stage, comm=fsdp_cp_comm, syncs_batchnorm=True)
STRATEGIES: dict[str, StrategySpec] = {
    REFERENCE: StrategySpec(
        apply_single,
        None,
        stage="dp",
        comm=no_comm,
        syncs_batchnorm=True,
        shards="nothing: the reference run",
    ),
    # DataParallel copies through torch.cuda.comm, never c10d: no process-group traffic at all.
    "dp": StrategySpec(
        apply_dp,
        None,
        stage="dp",
        comm=no_comm,
        shards="the batch over GPUs in one process",
        drops_aux_loss="nn.DataParallel's replicas compute it, and are dropped after each forward",
        no_compile="nn.DataParallel copies the model to each GPU every step, and a compiled forward "
        "belongs to the original",
    ),
    "ddp": StrategySpec(
        apply_ddp,
        "dp_replicate",
        stage="dp",
        comm=ddp_comm,
        wraps_ddp=True,
        syncs_batchnorm=True,
        shards="the batch; grads all-reduced",
    ),
    "zero1": StrategySpec(
        apply_zero1,
        "dp_replicate",
        stage="os",
        comm=zero1_comm,
        wraps_ddp=True,
        syncs_batchnorm=True,
        shards="the batch + optimizer state",
    ),
    "fsdp": StrategySpec(apply_fsdp, **_FSDP, shards="the batch + optimizer state, grads, params"),
    "zero2": StrategySpec(
        apply_fsdp, **_FSDP, fixed_reshard=False, shards="the batch + optimizer state, grads"
    ),
    "zero3": StrategySpec(
        apply_fsdp, **_FSDP, fixed_reshard=True, shards="the batch + optimizer state, grads, params"
    ),
    "deepspeed": StrategySpec(
        apply_deepspeed,
        "dp_replicate",
        stage=deepspeed_stage,
        memory=deepspeed_memory,
        # its reduce/gather buckets; its stage; offload_optimizer
        reads=frozenset({"bucket_cap_mb", "zero_stage", "offload"}),
        comm=deepspeed_comm,
        check=check_deepspeed,
        # Its engine says why (parallel/strategies/deepspeed.py) and refuses a load too, after launch.
        resumable=DeepSpeedEngine.resumable,
        label=lambda s: f"deepspeed_zero{s.zero_stage}",
        no_compile="DeepSpeed compiles through its own engine.compile(), which paralab does not drive",
        shards="DeepSpeed's ZeRO: the batch + optimizer state (stage 1), grads (2), params (3)",
    ),
    # RPC, not c10d, carries its gradients: paralab's counter sees none of it (no prediction).
    "ps": StrategySpec(
        apply_ps,
        "dp_replicate",
        check=check_ps,
        shards="the batch; grads to a parameter server on rank 0 (RPC)",
    ),
    "tp": StrategySpec(apply_tp, "tp", needs_tp_plan=True, comm=tp_comm, shards="each layer's weights"),
    "pp": StrategySpec(
        apply_pipeline, "pp", pipelined=True, comm=pp_comm, shards="layers; microbatches pipelined"
    ),
    "mp": StrategySpec(
        apply_pipeline,
        "pp",
        pipelined=True,
        one_batch=True,
        comm=pp_comm,
        shards="layers; one batch at a time",
    ),
    "hsdp": StrategySpec(
        apply_fsdp,
        "dp_shard",
        frozenset({"dp_replicate"}) | CP_EP,
        stage=fsdp_stage,
        comm=fsdp_cp_comm,
        syncs_batchnorm=True,
        label=lambda s: f"hsdp_r{s.dp_replicate}",  # its replica groups: the shard degree is the rest
        shards="the batch + optimizer state, grads, params within each of strategy.dp_replicate groups",
    ),
    "fsdp_tp": StrategySpec(
        apply_fsdp_tp,
        "dp_shard",
        TP | {"dp_replicate", "cp"},
        needs_tp_plan=True,
        comm=fsdp_tp_comm,
        shards="batch × FSDP, weights × TP",
    ),
    "ddp_pp": StrategySpec(
        apply_ddp_pp,
        "dp_replicate",
        PP,
        pipelined=True,
        comm=ddp_pp_comm,
        wraps_ddp=True,
        shards="batch × DDP, layers × PP",
    ),
    "fsdp_tp_pp": StrategySpec(
        apply_fsdp_tp_pp,
        "dp_shard",
        TP | PP | {"dp_replicate", "cp"},
        needs_tp_plan=True,
        pipelined=True,
        shards="batch × FSDP, weights × TP, layers × PP",
    ),
}


def get_spec(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy '{name}'; choose one of: {', '.join(STRATEGIES)}") from None


# The degrees a strategy may read from its config, outermost first (as parallel/mesh.py's DIMS).
CONFIGURABLE = ("pp", "dp_replicate", "cp", "tp", "ep")


def resolve_degrees(strategy: StrategyConfig, world_size: int) -> Degrees:
    """Degrees for `strategy` on `world_size` ranks: the configured ones, and the `fill` dim takes
    the rest. ep is not a factor of the world: it splits dp_shard."""
    spec = get_spec(strategy.name)
    if spec.fill is None:
        if world_size != 1:
            raise ConfigError(
                f"strategy={strategy.name} runs in one process, but the launcher starts {world_size}; "
                "set launcher.nproc_per_node=1 launcher.nnodes=1 (or launcher=local)"
            )
        return Degrees()
    configured = {dim: getattr(strategy, dim) if dim in spec.configured else 1 for dim in CONFIGURABLE}
    for dim, value in configured.items():
        if value < 1:
            raise ConfigError(f"strategy.{dim}={value} must be >= 1")
    for dim in CONFIGURABLE:
        if dim not in spec.configured and dim != spec.fill and getattr(strategy, dim) != 1:
            users = [n for n, sp in STRATEGIES.items() if dim in sp.configured]
            raise ConfigError(
                f"strategy={strategy.name} does not use strategy.{dim}={getattr(strategy, dim)}; "
                f"drop it, or pick a strategy with {dim} ({', '.join(users)})"
            )
    factors = {d: v for d, v in configured.items() if d != "ep"}
    rest = math.prod(factors.values())
    if world_size % rest:
        named = " × ".join(f"{d}={v}" for d, v in factors.items() if v > 1)
        raise ConfigError(
            f"{named} = {rest} ranks, but the launcher gives {world_size}: strategy={strategy.name} "
            f"needs a world size that is a multiple of {rest} ({spec.fill} takes the rest)"
        )
    degrees = dict(factors)
    degrees[spec.fill] = world_size // rest
    ep = configured["ep"]
    if degrees.get("dp_shard", 1) % ep:
        raise ConfigError(
            f"strategy.ep={ep} must divide dp_shard = {degrees.get('dp_shard', 1)} (the experts are "
            f"split over data-parallel ranks); use a world size that leaves dp_shard a multiple of {ep}"
        )
    return Degrees(**degrees, ep=ep)
