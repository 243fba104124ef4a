"""Activation memory, measured: the bytes autograd keeps from forward for backward, per block.

Armed on sampled steps only (its hooks cost every op a Python call), from before the first
forward to after the last backward:
- a saved-tensor hook sees every tensor autograd saves outside a checkpointed region;
- a checkpointed block saves its inputs through autograd too (its recomputation reads them);
  under selective AC its policy keeps op outputs in a cache of its own, which parallel/levers.py
  shows us;
- parameters and buffers saved for backward (a linear layer's weight, rotary tables) are model
  state, counted apart: whatever storage a module's parameters and buffers use as it runs (FSDP's
  gathered ones too) is left out.
Each storage counts once, whoever saves it and however many views of it are saved. Bytes are
attributed to the block whose forward is running ("other": the stem, the head and the loss).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.hooks import RemovableHandle

from parallel.layout import local_tensor
from parallel.levers import listen_to_kept

OUTSIDE_BLOCKS = "other"
_BLOCK = re.compile(r"(?:^|\.)blocks\.([^.]+)$")


def named_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's blocks by their names in the full model (pipeline stages keep them)."""
    out = {}
    for name, module in model.named_modules():
        m = _BLOCK.search(name)
        if m is not None:
            out[m.group(1)] = module
    return out


class SavedActivations:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks = named_blocks(model)
        self.by_block: dict[str, int] = {}
        # data_ptr -> a weak reference to the storage seen there: a storage freed since (FSDP's
        # gathered parameters after their block, a micro-batch after its backward) leaves its
        # address to the next one, which is then another storage.
        self._seen: dict[int, StorageWeakRef] = {}
        # Where the running module's parameters and buffers are now: FSDP moves gathered ones
        # (resizing a storage in place), so what held one a block ago may hold an activation now.
        self._root_params: set[int] = set()
        self._block_params: set[int] = set()
        self._current: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._stack: contextlib.ExitStack | None = None

    def clear(self) -> None:
        """Nothing measured (yet) on this sample."""
        self.by_block = {}

    @property
    def total(self) -> int:
        return sum(self.by_block.values())

    def arm(self, on: bool) -> None:
        """Count what the next forwards save, until disarmed (after their backward)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None
            for h in self._handles:
                h.remove()
            self._handles.clear()
        if not on:
            return
        self.by_block = defaultdict(int)
        self._seen.clear()
        self._root_params = _places(self.model)
        self._block_params = set()
        self._current.clear()
        for name, block in self.blocks.items():
            # Before the strategies' pre-hooks: whatever they save belongs to this block.
            self._handles.append(block.register_forward_pre_hook(self._enter(name), prepend=True))
            # After them (FSDP's all-gather): the parameters are what runs.
            self._handles.append(block.register_forward_pre_hook(self._block_runs))
            self._handles.append(block.register_forward_hook(self._leave, always_call=True))
        # The stem and head too: a pipeline stage under FSDP gathers them in its own pre-hook.
        for name, child in self.model.named_children():
            if name != "blocks":
                self._handles.append(child.register_forward_pre_hook(self._block_runs))
                self._handles.append(child.register_forward_hook(self._leave_child, always_call=True))
        self._handles.append(self.model.register_forward_pre_hook(self._root_runs))
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        stack.enter_context(listen_to_kept(self._count))
        # torch warns that selective AC's cache will pass through these hooks in a later release:
        # counted once by storage, it is the same count either way.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", "A saved_tensors_hooks context", FutureWarning)
        self._stack = stack

    def _root_runs(self, module: nn.Module, args: object) -> None:
        self._root_params = _places(module)

    def _block_runs(self, module: nn.Module, args: object) -> None:
        self._block_params = _places(module)

    def _enter(self, name: str):
        def hook(module: nn.Module, args: object) -> None:
            self._current.append(name)

        return hook

    def _leave(self, module: nn.Module, args: object, output: object) -> None:
        self._block_params = set()
        if self._current:
            self._current.pop()

    def _leave_child(self, module: nn.Module, args: object, output: object) -> None:
        self._block_params = set()

    def _pack(self, t: Tensor) -> Tensor:
        self._count(t)
        return t

    def _count(self, t: Tensor) -> None:
        for storage in _storages(t):
            where = storage.data_ptr()
            if where in self._root_params or where in self._block_params or _holds(self._seen, storage):
                continue
            self._seen[where] = StorageWeakRef(storage)
            block = self._current[-1] if self._current else OUTSIDE_BLOCKS
            self.by_block[block] += storage.nbytes()


def _places(module: nn.Module) -> set[int]:
    return {local_tensor(p).untyped_storage().data_ptr() for p in (*module.parameters(), *module.buffers())}


def _storages(t: Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages behind a tensor: a DTensor's local shard, a wrapper subclass's inner tensors
    (functional collectives' AsyncCollectiveTensor has no storage of its own)."""
    t = local_tensor(t)
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _storages(getattr(t, name))
    else:
        yield t.untyped_storage()


def _holds(seen: dict[int, StorageWeakRef], storage: torch.UntypedStorage) -> bool:
    ref = seen.get(storage.data_ptr())
    return ref is not None and not ref.expired()
