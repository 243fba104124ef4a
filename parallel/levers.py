"""Levers on a model's blocks, applied before its strategy: activation checkpointing and torch.compile.

Both keep the model's module tree and names as they are, so every strategy (FSDP's units, TP's
plan, a pipeline's cut, checkpoints) sees the same model with or without them:
- activation checkpointing runs a block's forward through torch.utils.checkpoint (non-reentrant):
  the block's class becomes a subclass whose forward does so, as FSDP2's fully_shard swaps a
  module's class. Copies of the block (DataParallel's replicas) recompute themselves; the
  strategies' hooks (FSDP's all-gather) run around forward, outside the recomputed region, as
  under torchtitan's checkpoint wrapper. torch's composable `checkpoint` (hooks) would do the
  same but recompute only once, and the zero-bubble pipeline schedules recompute twice (their
  input and weight gradients are two backward passes);
- compile replaces a block's `forward` with its torch.compile'd self, lazily: it traces at the first
  call, after the strategy has made the parameters what they will be (DTensors under TP), and the
  strategies' hooks stay outside the compiled code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from experiments.config.schema import AC, Config, ConfigError
from models.staged import blocks_of

aten = torch.ops.aten
# What selective AC keeps, as torchtitan's per-op policy does: the outputs of the ops that cost
# FLOPs (matmuls, convolutions, attention), while norms, activations and adds are recomputed.
SAVED_OPS = frozenset(
    {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten.convolution.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
    }
)

# Called with each tensor selective AC keeps for backward, while a measurement listens
# (experiments/measure/activations.py): the policy keeps them in a cache of its own, which
# saved-tensor hooks do not see.
_kept_listeners: list[Callable[[Tensor], None]] = []


def _policy(ctx: SelectiveCheckpointContext, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    if op not in SAVED_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if _kept_listeners and not ctx.is_recompute:
        outs = ctx.op_output if isinstance(ctx.op_output, tuple) else (ctx.op_output,)
        for t in outs:
            if isinstance(t, Tensor):
                for listen in _kept_listeners:
                    listen(t)
    return CheckpointPolicy.MUST_SAVE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_policy)


@contextlib.contextmanager
def listen_to_kept(listen: Callable[[Tensor], None]) -> Iterator[None]:
    """Call `listen` with every tensor selective AC keeps for backward in this context."""
    _kept_listeners.append(listen)
    try:
        yield
    finally:
        _kept_listeners.remove(listen)


def checkpointed_blocks(num_blocks: int, ac: AC, every: int) -> list[int]:
    """Indices of the blocks `train.ac` checkpoints: every `every`-th, counting from 1."""
    if ac == AC.none:
        return []
    return [i for i in range(num_blocks) if (i + 1) % every == 0]


_checkpointed: dict[tuple[type, AC], type] = {}


def _checkpointed_class(cls: type[nn.Module], ac: AC) -> type[nn.Module]:
    """`cls` whose forward is recomputed in backward (one subclass per class and mode)."""
    key = (cls, ac)
    if key not in _checkpointed:
        context_fn = _selective_contexts if ac == AC.selective else noop_context_fn

        def forward(self: nn.Module, *args: object, **kwargs: object) -> object:
            run = super(sub, self).forward
            return checkpoint(run, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})
        _checkpointed[key] = sub
    return _checkpointed[key]


def apply_ac(model: nn.Module, ac: AC, every: int) -> list[str]:
    """Checkpoint the chosen blocks in place; returns their names."""
    blocks = blocks_of(model)
    if blocks is None:
        return []
    names = list(blocks)
    chosen = [names[i] for i in checkpointed_blocks(len(names), ac, every)]
    for name in chosen:
        block = blocks[name]
        block.__class__ = _checkpointed_class(type(block), ac)
    return chosen


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block's forward (the whole model's, if it has no blocks)."""
    blocks = blocks_of(model)
    for m in list(blocks.values()) if blocks is not None else [model]:
        m.forward = torch.compile(m.forward)


# Pipeline schedules that run backward twice per micro-batch (input gradients, then weights):
# torch's selective AC keeps its cache for one backward only.
TWO_BACKWARDS = frozenset({"interleaved_zb", "zbv"})


def check_levers(cfg: Config, model: nn.Module, no_compile: str | None, pipelined: bool) -> None:
    """What activation checkpointing and compile cannot do here, before launch (`model` on meta)."""
    t = cfg.train
    if t.ac == AC.none and t.ac_every != 1:
        raise ConfigError(
            f"train.ac_every={t.ac_every} does nothing with train.ac=none; set train.ac=full or selective"
        )
    if t.ac != AC.none:
        blocks = blocks_of(model)
        if blocks is None:
            raise ConfigError(
                f"train.ac={t.ac} checkpoints the model's blocks, and model={cfg.model.label} declares "
                "none (an nn.ModuleDict `blocks`, docs/models.md); set train.ac=none"
            )
        if t.ac_every > len(blocks):
            raise ConfigError(
                f"train.ac_every={t.ac_every} is more than the model's {len(blocks)} blocks, so no block "
                f"would be checkpointed; use train.ac_every <= {len(blocks)}"
            )
        if t.ac == AC.selective and pipelined and cfg.strategy.schedule in TWO_BACKWARDS:
            raise ConfigError(
                f"train.ac=selective cannot run under strategy.schedule={cfg.strategy.schedule}: its "
                "weight gradients are a second backward, and torch's selective checkpointing allows "
                "one; use train.ac=full, or another schedule"
            )
    if t.compile and no_compile is not None:
        raise ConfigError(f"train.compile=true cannot run under strategy={cfg.strategy.name}: {no_compile}")
