"""One optimizer step, and nothing else: no .item(), no timer, no collective the strategy does not need.

The step leaves on the device what the Meter will log: this rank's losses and its share of the
squared gradient norm. Only gradient clipping needs the global norm inside the step, and then it
costs one all-reduce of one scalar, not one per parameter, and no host sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate

from experiments.train.state import TrainState
from parallel.base import Parallelized
from parallel.layout import local_tensor


def _holders(p: DTensor, ranks_per_stage: int) -> int:
    """How many ranks hold the same values of p's gradient (its copies across the world).

    A DTensor is split over its mesh and copied along the mesh dims where it is replicated, and
    across the stage's ranks outside its mesh.
    """
    mesh = p.device_mesh
    copies = ranks_per_stage // mesh.size()
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Partial):
            raise NotImplementedError(f"a Partial gradient placement has no local norm: {p.placements}")
        if isinstance(placement, Replicate):
            copies *= mesh.size(dim)
    return copies


def _stage_index(mesh: DeviceMesh) -> int:
    """This rank's place among the ranks of its pipeline stage (0 .. ranks per stage - 1)."""
    coordinate = mesh.get_coordinate()
    assert coordinate is not None and mesh.mesh_dim_names is not None
    index = 0
    for name, size, c in zip(mesh.mesh_dim_names, mesh.mesh.shape, coordinate, strict=True):
        if name != "pp":
            index = index * int(size) + c
    return index


def _share(params: list[nn.Parameter], ranks: int, mine: int) -> list[nn.Parameter]:
    """This rank's share of parameters that every rank holds.

    Dealt largest first, in turn: the ranks' counts of tensors differ by one at most (small ones
    cost a kernel call each, whatever their size), and their elements about as little. With more
    ranks than tensors some get none. Every rank deals the same parameter order the same way.
    """
    order = sorted(range(len(params)), key=lambda i: -params[i].numel())
    return [params[i] for i in sorted(order[mine::ranks])]


class GradNorm:
    """The global gradient norm from one local sum of squares per step.

    Each rank sums the squares of its local gradient shards, each divided by how many ranks hold
    the same values; summing that over the world (one all-reduce, on log steps) gives the norm's
    square whatever the sharding, as torch's clip_grad_norm_ reduces a DTensor norm once. Plain
    gradients, the same on every rank of a stage (DDP's), are split instead: each rank squares
    its share of them once, rather than all of them to be divided.
    """

    def __init__(self, model: nn.Module, mesh: DeviceMesh, device: torch.device | None = None) -> None:
        per_stage = mesh.size() // mesh["pp"].size()
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups: dict[int, list[nn.Parameter]] = {}
        plain = [p for p in self.params if not isinstance(p, DTensor)]
        if plain:
            groups[1] = _share(plain, per_stage, _stage_index(mesh))
        for p in self.params:
            if isinstance(p, DTensor):
                groups.setdefault(_holders(p, per_stage), []).append(p)
        self.groups = [(1.0 / h, ps) for h, ps in sorted(groups.items())]
        # The run's device: where the norm is reduced and logged, even where the gradients
        # are offloaded to host memory (strategy.offload).
        self.device = device or next(model.parameters()).device

    # Under no_grad, DTensor.to_local is an attribute read; with grad mode on it is an autograd
    # Function call per parameter per step.
    @torch.no_grad()
    def local_grads(self) -> list[Tensor]:
        """Every local gradient on this rank, for clipping (not only those its norm share sums)."""
        return [local_tensor(p.grad) for p in self.params if p.grad is not None]

    @torch.no_grad()
    def local_sq(self) -> Tensor:
        """This rank's share of the squared global norm, on the device (no sync)."""
        total: Tensor | None = None
        for weight, params in self.groups:
            grads = [local_tensor(p.grad) for p in params if p.grad is not None]
            if not grads:
                continue
            # At least fp32 (bf16 gradients), and fp64 ones as they are; the Meter buffers fp32.
            dtype = torch.promote_types(grads[0].dtype, torch.float32)
            norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=dtype))
            sq = torch.dot(norms, norms).float()
            if weight != 1.0:
                sq = sq * weight
            sq = sq.to(self.device, non_blocking=True)  # no copy unless offloaded to host memory
            total = sq if total is None else total + sq
        # A fresh zero: clipping all-reduces the result in place, and the Meter buffers it.
        return torch.zeros((), dtype=torch.float32, device=self.device) if total is None else total


@dataclass
class StepResult:
    losses: list[Tensor]  # this rank's mean loss per micro-step (empty off the last pipeline stage)
    grad_sq: Tensor  # squared grad norm: this rank's share, or the global value when clipping
    grad_sq_is_global: bool


def clip_(norm: GradNorm, sq: Tensor, max_norm: float) -> None:
    """Scale every local gradient by min(1, max_norm / norm) in place, on the device."""
    coef = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
    grads = norm.local_grads()
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))


def replay_first_backward(par: Parallelized, batch: tuple[Tensor, Tensor], device: torch.device) -> None:
    """One forward/backward whose every effect is undone but the strategy's own settling.

    Gradients are dropped, buffers (BatchNorm statistics) restored, and the RNG streams (dropout)
    left where they were; the optimizer, scheduler and data position do not move.
    """
    x, y = (t.to(device) for t in batch)
    buffers = [(b, b.detach().clone()) for b in par.model.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        par.forward_backward(x, y, 1.0, True)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    par.model.zero_grad(set_to_none=True)


def train_step(
    par: Parallelized,
    state: TrainState,
    batches: Iterator[tuple[Tensor, Tensor]],
    norm: GradNorm,
    accum: int,
    grad_clip: float,
    device: torch.device,
    probe: Callable[[], None] | None = None,
) -> StepResult:
    """Forward and backward over `accum` micro-steps, then one optimizer step."""
    losses: list[Tensor] = []
    for micro in range(accum):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = par.forward_backward(x, y, 1.0 / accum, micro == accum - 1)
        if loss is not None:
            losses.append(loss)
    state.data_position += accum
    if par.after_backward is not None:
        par.after_backward()
    if probe is not None:
        probe()  # the Meter's memory probe, on sampled steps: gradients exist only here
    if par.engine is not None:
        # The engine holds the reduced gradients in its own partitions: it steps, zeroes them and
        # computes the global norm itself.
        sq, is_global = par.engine.step(), True
    else:
        sq, is_global = norm.local_sq(), grad_clip > 0
        if grad_clip > 0:
            if dist.get_world_size() > 1:
                dist.all_reduce(sq)
            clip_(norm, sq, grad_clip)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.step += 1
    return StepResult(losses, sq, is_global)
