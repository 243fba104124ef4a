"""What a strategy hands the training loop, so the loop never needs to know which one it runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from experiments.config.schema import Config
from parallel.optim import OptimizerSpec

# (inputs, targets, loss scale, sync gradients this micro-step?) -> this rank's mean loss, or None
ForwardBackward = Callable[[Tensor, Tensor, float, bool], Tensor | None]
# (inputs, targets) -> this rank's model output (logits), or None where it has none (pipelines)
EvalForward = Callable[[Tensor, Tensor], Tensor | None]


@dataclass
class StrategyContext:
    cfg: Config
    device: torch.device
    loss_fn: Callable[[Tensor, Tensor], Tensor]

    def autocast(self) -> AbstractContextManager:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float64 if self.cfg.train.precision == "fp64" else torch.float32

    def inputs(self, x: Tensor) -> Tensor:
        """A batch's inputs in the parameters' dtype (token ids stay integers)."""
        if self.cfg.train.precision == "fp64" and x.is_floating_point():
            return x.to(torch.float64)
        return x


class Engine:
    """A training engine that owns the optimizer step (DeepSpeed, a parameter server), so the loop
    goes through it where it would step, or read the gradients and optimizer state, itself.
    Where a method returns None, paralab measures or saves as for any other strategy."""

    # Whether a checkpoint can be loaded into it (saving always works).
    resumable: bool = True

    def step(self) -> Tensor:
        """Reduce what is left, step, zero the gradients; the global squared gradient norm, on the device."""
        raise NotImplementedError

    def whole_parameters(self, modify: bool = False) -> AbstractContextManager:
        """Within it, the model's parameters hold their whole values (to save or load them by name)."""
        return nullcontext()

    def optimizer_state(self, model: nn.Module) -> dict[str, dict[str, Tensor]] | None:
        """The optimizer state by parameter name, as whole tensors."""
        return None

    def load(self, model: nn.Module, optim: dict[str, dict[str, Tensor]]) -> None:
        """Within whole_parameters(modify=True): take the loaded parameters and optimizer state."""

    def memory(self) -> dict[str, int] | None:
        """Bytes of model state held now in the engine's own buffers: params, grads, optim."""
        return None

    def close(self) -> None:
        """After the last step, on every rank."""


def _plain_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return spec(model.parameters())


@dataclass
class Parallelized:
    # The unwrapped module(s) holding this rank's parameters: for state dicts and the optimizer.
    model: nn.Module
    forward_backward: ForwardBackward
    make_optimizer: Callable[[nn.Module, OptimizerSpec], torch.optim.Optimizer] = _plain_optimizer
    # Pipeline ranks that do not run the last stage never see a loss.
    holds_loss: bool = True
    # Parameters split across the pipeline: grad norms must be summed over this group.
    pp_group: torch.distributed.ProcessGroup | None = None
    # Pipelines: this rank's compute since the last call (for the measured bubble), as a function
    # that reads the seconds once the device has caught up (CUDA events need a sync first).
    busy_seconds: Callable[[], Callable[[], float]] | None = None
    # Run once per step after the last backward, before the norm and the optimizer see the grads.
    after_backward: Callable[[], None] | None = None
    # DDP lays out its gradient buckets in the order the first backward produced gradients, and
    # bucket layout decides each element's summation order in a >2-rank all-reduce: a resumed run
    # replays one (discarded) forward/backward so its buckets are those of the uninterrupted run.
    replay_on_resume: bool = False
    # Set (by make_optimizer) where an engine owns gradients and optimizer partitions: the loop
    # calls its step in place of optimizer.step() and zero_grad(), and measures through it.
    engine: Engine | None = None
    notes: list[str] = field(default_factory=list)
    # GPUs this rank computes on: nn.DataParallel drives every visible one from one process.
    devices_per_rank: int = 1
    # Forward only, for evaluation (called under no_grad, in eval mode). The default calls `model`
    # itself: the unwrapped replica (DDP, ZeRO-1, DataParallel), or the sharded module (FSDP, TP),
    # which runs its own collectives. Calling a DDP wrapper here would change when it next
    # broadcasts buffers.
    eval_forward: EvalForward | None = None
    # The part of a batch's targets this rank's output covers: its share of each sequence under
    # context parallelism; None: all of them.
    local_targets: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.eval_forward is None:
            self.eval_forward = lambda x, y: self.model(x)


def module_forward_backward(
    module: nn.Module,
    ctx: StrategyContext,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> ForwardBackward:
    """Forward, loss, backward for strategies whose module is called like the original model.

    `no_sync` wraps forward and backward of micro-steps that only accumulate gradients locally.
    """

    def forward_backward(x: Tensor, y: Tensor, scale: float, sync: bool) -> Tensor:
        with nullcontext() if sync or no_sync is None else no_sync():
            with ctx.autocast():
                loss = ctx.loss_fn(module(x), y)
            # Without accumulation the scale is 1: no extra op (and its backward node) per step.
            (loss if scale == 1.0 else loss * scale).backward()
        return loss.detach()

    return forward_backward


@contextmanager
def fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    """FSDP2's counterpart of DDP.no_sync: skip the reduce-scatter while accumulating."""
    module.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)  # type: ignore[operator]
