"""Hybrids on one DeviceMesh: FSDP+TP (2D), DDP+PP (2D), FSDP+TP+PP (3D).

Order, as torchtitan applies it: tensor parallelism first, then data-parallel sharding or
replication; the pipeline split wraps both (split first, then the rest per stage).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from models.staged import StagedModel
from parallel.base import Parallelized, StrategyContext
from parallel.strategies.ddp import wrap_ddp
from parallel.strategies.fsdp import apply_fsdp, shard_model
from parallel.strategies.pipeline import Stage, apply_pipeline
from parallel.strategies.tensor import tensor_parallelize


def apply_fsdp_tp(model: StagedModel, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    tensor_parallelize(model, mesh["tp"], ctx.cfg.strategy.sequence_parallel)
    return apply_fsdp(model, mesh, ctx)


def apply_ddp_pp(model: StagedModel, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    def replicate(stage: Stage) -> nn.Module:
        return wrap_ddp(stage, mesh, ctx)

    par = apply_pipeline(model, mesh, ctx, replicate)
    par.replay_on_resume = True
    return par


def apply_fsdp_tp_pp(model: StagedModel, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    def tp_then_fsdp(stage: Stage) -> nn.Module:
        tensor_parallelize(stage, mesh["tp"], False)
        shard_model(stage, mesh, ctx)
        return stage

    return apply_pipeline(model, mesh, ctx, tp_then_fsdp)
