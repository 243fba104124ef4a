"""Pipeline parallelism with torch.distributed.pipelining, and the naive layer split (`mp`).

The model is cut at its declared block boundaries. A stage is a view on the model's own
submodules (no copies), so its parameter names are the full model's; the other parallelisms are
applied to each stage before it joins the schedule.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from models.staged import StagedModel
from parallel.base import Parallelized, StrategyContext

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage

# torch.distributed.pipelining is imported where it is used: it pulls in torch._dynamo, ~0.8 s
# (measured on a 2-core Zen 3) in every process that imports paralab, pipelined job or not.

# config name -> torch schedule name
SCHEDULES = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved1f1b": "Interleaved1F1B",
    "looped_bfs": "LoopedBFS",
    "interleaved_zb": "InterleavedZeroBubble",
    "zbv": "ZBVZeroBubble",
}
# Schedules whose ranks hold stages at both ends of the pipe ("V" placement) rather than looping.
V_SCHEDULES = {"zbv"}


def is_multi_stage(schedule: str) -> bool:
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

    return issubclass(get_schedule_class(SCHEDULES[schedule]), PipelineScheduleMulti)


def stages_per_rank(schedule: str, configured: int) -> int:
    return configured or (2 if is_multi_stage(schedule) else 1)


def split_blocks(names: list[str], num_stages: int) -> list[list[str]]:
    """Contiguous, as-even-as-possible groups of blocks; earlier stages take the remainder."""
    base, extra = divmod(len(names), num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append(names[start : start + n])
        start += n
    return out


def stage_ids(pp_rank: int, pp: int, v: int, schedule: str) -> list[int]:
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(v)]


def rank_blocks(
    num_blocks: int, pp: int, pp_rank: int, schedule: str, configured: int
) -> tuple[list[int], bool, bool]:
    """Positions of the blocks a pipeline rank holds, and whether it holds the stem and the head."""
    v = stages_per_rank(schedule, configured)
    n_stages = pp * v
    groups = split_blocks(list(range(num_blocks)), n_stages)
    ids = stage_ids(pp_rank, pp, v, schedule)
    return [b for i in sorted(ids) for b in groups[i]], 0 in ids, n_stages - 1 in ids


class Stage(StagedModel):
    """A view of some of a StagedModel's blocks, plus its stem on the first stage and head on the last."""

    def __init__(self, model: StagedModel, blocks: list[str], first: bool, last: bool) -> None:
        super().__init__()
        self.stem = model.stem if first else None
        self.blocks = nn.ModuleDict({name: model.blocks[name] for name in blocks})
        self.head = model.head if last else None
        self._source = model._source if isinstance(model, Stage) else type(model)

    def tp_plan(self, sequence_parallel: bool):
        return self._source.tp_plan(self, sequence_parallel)  # type: ignore[arg-type]


class BusyClock:
    """Time a rank spends in its stages' compute (forward, backward, weight-grad chunks).

    Everything else in a schedule's step is waiting on neighbours or the bubble, so
    1 − busy / step time is the measured bubble share. On CUDA the host runs ahead of the device
    (a NCCL recv only makes the stream wait), so host clocks would time kernel launches: CUDA
    events on the stream bracket each chunk instead, and are read once the device has caught up.
    """

    METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.busy = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def wrap(self, stage: PipelineStage) -> None:
        for name in self.METHODS:
            method = getattr(stage, name, None)
            if method is not None:
                setattr(stage, name, self._timed(method))

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    return fn(*args, **kwargs)
                finally:
                    end.record()
                    self.events.append((start, end))
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - t0

        return timed

    def take(self) -> Callable[[], float]:
        """The compute since the last call, as seconds to read after the next device sync."""
        busy, self.busy = self.busy, 0.0
        events, self.events = self.events, []
        if not events:
            return lambda: busy
        return lambda: sum(start.elapsed_time(end) for start, end in events) / 1000.0


def _stagewise_forward(
    modules: dict[int, nn.Module],
    owner: dict[int, int],
    group: torch.distributed.ProcessGroup,
    n_stages: int,
    x: Tensor,
    y: Tensor,
) -> Tensor | None:
    """Forward the whole local batch through the stages in order, for evaluation only.

    Each stage's output goes to the next stage's rank (or stays, when that rank holds it too);
    the rank of the last stage returns the model's output.
    """
    here = torch.distributed.get_rank(group)
    carry: Tensor | None = x if owner[0] == here else None
    for sid in range(n_stages):
        if owner[sid] != here:
            continue
        if carry is None:
            box: list[Tensor | None] = [None]
            torch.distributed.recv_object_list(box, group=group, group_src=owner[sid - 1])
            carry = box[0].to(x.device)  # type: ignore[union-attr]
        carry = modules[sid](carry)
        if sid == n_stages - 1:
            return carry
        if owner[sid + 1] != here:
            torch.distributed.send_object_list([carry], group=group, group_dst=owner[sid + 1])
            carry = None
    return None


def apply_pipeline(
    model: StagedModel,
    mesh: DeviceMesh,
    ctx: StrategyContext,
    per_stage: Callable[[Stage], nn.Module] = lambda stage: stage,
) -> Parallelized:
    """Split `model` over the mesh's pp dim; `per_stage` applies the other parallelisms to each stage."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class

    s, t = ctx.cfg.strategy, ctx.cfg.train
    pp_mesh = mesh["pp"]
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    v = stages_per_rank(s.schedule, s.stages_per_rank)
    n_stages = pp * v
    groups = split_blocks(list(model.blocks.keys()), n_stages)
    ids = stage_ids(pp_rank, pp, v, s.schedule)

    # One module holding everything this rank owns, with the full model's names: for the optimizer,
    # state dicts and memory accounting.
    local_blocks = [b for i in sorted(ids) for b in groups[i]]
    owned = Stage(model, local_blocks, first=0 in ids, last=n_stages - 1 in ids)
    stages = []
    clock = BusyClock(ctx.device)
    for sid in ids:
        module = per_stage(Stage(owned, groups[sid], first=sid == 0, last=sid == n_stages - 1))
        stages.append(PipelineStage(module, sid, n_stages, ctx.device, group=pp_mesh.get_group()))
        clock.wrap(stages[-1])

    accum = t.grad_accum_steps

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return ctx.loss_fn(out, y)

    # Gradient accumulation in a pipeline is more microbatches: one flush, one gradient sync.
    cls = get_schedule_class(SCHEDULES[s.schedule])
    n_micro = s.microbatches * accum
    schedule = cls(stages if v > 1 else stages[0], n_micro, loss_fn=loss_fn)
    first, last = owned.stem is not None, owned.head is not None
    pending: list[tuple[Tensor, Tensor]] = []

    def forward_backward(x: Tensor, y: Tensor, scale: float, sync: bool) -> Tensor | None:
        pending.append((x, y))
        if not sync:
            return None
        xs = torch.cat([p[0] for p in pending])
        ys = torch.cat([p[1] for p in pending])
        pending.clear()
        losses: list[Tensor] = []
        with ctx.autocast():
            schedule.step(
                *((xs,) if first else ()), target=ys if last else None, losses=losses if last else None
            )
        return torch.stack([loss.detach() for loss in losses]).mean() if last else None

    def eval_forward(x: Tensor, y: Tensor) -> Tensor | None:
        # Forward only, through the same stages; the last stage returns the merged outputs. The
        # first training step after it re-initialises the stages for backward (torch's mode switch).
        out = schedule.eval(*((x,) if first else ()), target=y if last else None)
        return out if last else None

    if s.schedule in V_SCHEDULES:
        # torch 2.14.1's eval() runs ZBV's backward-input actions, which fail without backward.
        owner = {sid: r for r in range(pp) for sid in stage_ids(r, pp, v, s.schedule)}
        modules = {stage.stage_index: stage.submod for stage in stages}
        eval_forward = functools.partial(_stagewise_forward, modules, owner, pp_mesh.get_group(), n_stages)

    return Parallelized(
        model=owned,
        forward_backward=forward_backward,
        eval_forward=eval_forward,
        holds_loss=last,
        pp_group=pp_mesh.get_group() if pp > 1 else None,
        busy_seconds=clock.take,
    )
