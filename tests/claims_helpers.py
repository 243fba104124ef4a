"""Run under `python -m torch.distributed.run --nproc_per_node=N -m tests.claims_helpers <job> <ckpt> <out>`.

Loads the model of the torch.distributed.checkpoint <ckpt> (written by job dir <job>) into the same
model sharded with paralab's own strategy at this world size (whatever world size saved it),
gathers the full parameters back and, on rank 0, writes them to <out> with torch.save, beside
the shape of each parameter's local shard here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor

from data import dataset_spec
from experiments.config.schema import load_frozen
from models import build_model
from parallel.base import StrategyContext
from parallel.mesh import build_mesh
from parallel.registry import get_spec, resolve_degrees


def load_resharded(job: Path, ckpt: Path, out: Path) -> None:
    cfg = load_frozen(job)
    dist.init_process_group("gloo")
    try:
        world = dist.get_world_size()
        # A different seed than the run's: only the checkpoint can make the weights equal.
        torch.manual_seed(cfg.seed + 1234)
        model = build_model(cfg.model, dataset_spec(cfg.dataset))
        mesh = build_mesh(resolve_degrees(cfg.strategy, world), "cpu")
        ctx = StrategyContext(cfg, torch.device("cpu"), F.cross_entropy)
        par = get_spec(cfg.strategy.name).apply(model, mesh, ctx)
        sharded = get_model_state_dict(par.model)
        dcp.load({"model": sharded}, checkpoint_id=str(ckpt))
        set_model_state_dict(par.model, sharded)
        local_shapes = {
            k: tuple(v.to_local().shape) if isinstance(v, DTensor) else None
            for k, v in get_model_state_dict(par.model).items()
        }
        full = get_model_state_dict(par.model, options=StateDictOptions(full_state_dict=True))
        if dist.get_rank() == 0:
            torch.save(
                {
                    "world": world,
                    "full": {k: v.detach().clone() for k, v in full.items()},
                    "local_shapes": local_shapes,
                },
                out,
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    load_resharded(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
