"""Everything a run must carry from one step to the next, as one object.

A checkpoint saves and loads exactly this: the model's local parameters, the optimizer and LR
schedule, the step count, how far the data stream has been read, and the RNGs training draws from.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from parallel.base import Engine


@dataclass
class TrainState:
    model: nn.Module  # this rank's (possibly sharded) parameters, under the full model's names
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0  # optimizer steps taken
    data_position: int = 0  # micro-batches drawn from the sampler
    # An engine that owns the optimizer's partitions (and perhaps the parameters): state is read
    # and written through it.
    engine: Engine | None = None

    def whole_parameters(self, modify: bool = False) -> AbstractContextManager:
        return self.engine.whole_parameters(modify) if self.engine is not None else nullcontext()

    @staticmethod
    def rng_state() -> dict[str, Any]:
        state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def set_rng_state(state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
