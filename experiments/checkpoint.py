"""Sharded checkpoints with torch.distributed.checkpoint: any strategy saves, any world size loads."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

CHECKPOINT_DIR = "checkpoint"


def save_model(model: nn.Module, job_dir: Path) -> None:
    # get_model_state_dict strips wrapper prefixes and keeps DTensor shards, so the saved keys are
    # the plain model's FQNs whatever the strategy.
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(job_dir / CHECKPOINT_DIR))


def load_full_model_state(job_dir: Path, like: nn.Module) -> dict[str, torch.Tensor]:
    """Load a checkpoint into one process's full (unsharded) state dict shaped like `like`."""
    state = {"model": {k: torch.empty_like(v) for k, v in like.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(job_dir / CHECKPOINT_DIR), no_dist=True)
    return state["model"]
