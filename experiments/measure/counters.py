"""What a step costs, measured on this rank: communication per collective and memory by category.

Communication: a TorchDispatchMode sees every c10d op, whoever issues it (DDP's C++ reducer,
FSDP, DTensor's functional collectives, ZeroRedundancyOptimizer, pipeline send/recv), with the
tensors, so it counts bytes too. It sits on every op's path, so it is switched on only for
sampled steps; the throughput we report comes from the other steps.
"""

from __future__ import annotations

import resource
import sys
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from experiments.measure.theory import ring_bytes
from parallel.layout import local_tensor, storage_bytes
from parallel.mesh import axis_of

# c10d op name -> (collective, which tensors make the payload S)
_OPS = {
    "allreduce_": ("all_reduce", "inputs"),
    "all_reduce": ("all_reduce", "inputs"),
    "allreduce_coalesced_": ("all_reduce", "inputs"),
    "_allgather_base_": ("all_gather", "output"),
    "allgather_": ("all_gather", "output"),
    "allgather_into_tensor_coalesced_": ("all_gather", "output"),
    "all_gather_into_tensor": ("all_gather", "output"),
    "_reduce_scatter_base_": ("reduce_scatter", "input"),
    "reduce_scatter_": ("reduce_scatter", "input"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "input"),
    "broadcast_": ("broadcast", "inputs"),
    "broadcast": ("broadcast", "inputs"),
    "send": ("send", "inputs"),
    "recv_": ("recv", "inputs"),
    "recv_any_source_": ("recv", "inputs"),
    "all_to_all_single": ("all_to_all", "inputs"),
    "alltoall_base_": ("all_to_all", "inputs"),
}
_NAMESPACES = ("c10d", "_c10d_functional")


def _tensors(obj: object) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for o in obj:
            yield from _tensors(o)


def _nbytes(obj: object) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _group(args: tuple) -> tuple[int, str]:
    """Size and mesh axis of the process group an op runs on: c10d ops carry it boxed, functional
    ones by name."""
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                group = dist.ProcessGroup.unbox(a)
            except (RuntimeError, TypeError):
                continue  # the ReduceOp is boxed the same way
            return group.size(), axis_of(group.group_name)
        if isinstance(a, str):
            try:
                return dist.distributed_c10d._resolve_process_group(a).size(), axis_of(a)
            except (KeyError, ValueError, RuntimeError):
                continue
    return 1, "other"


class CommCounter(TorchDispatchMode):
    """Counts c10d collectives: calls, payload bytes S, and ring-model bytes sent by this rank; in
    all and per mesh axis (the axis of the op's process group: parallel/mesh.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, float] = defaultdict(float)
        self.wire: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in _NAMESPACES:
            op = _OPS.get(func._opname)
            if op is not None:
                collective, payload = op
                # c10d's reduce-scatter takes (output, input); everything else leads with the payload.
                size = _nbytes(args[1] if payload == "input" and func.namespace == "c10d" else args[0])
                n, axis = _group(tuple(args) + tuple((kwargs or {}).values()))
                wire = ring_bytes(collective, size, n)
                for key in (collective, f"axis/{axis}/{collective}"):
                    self.calls[key] += 1
                    self.bytes[key] += size
                    self.wire[key] += wire
        return func(*args, **(kwargs or {}))

    def scalars(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in sorted(self.calls):
            out[f"comm/{c}_calls"] = self.calls[c]
            out[f"comm/{c}_bytes"] = self.bytes[c]
            out[f"comm/{c}_wire_bytes"] = self.wire[c]
        out["comm/total_wire_bytes"] = sum(v for k, v in self.wire.items() if not k.startswith("axis/"))
        return out


class GatheredParams:
    """Parameters a sharded model holds unsharded from the end of forward into backward.

    FSDP2 registers the gathered tensors as the module's parameters while they are unsharded; a
    forward hook on the root, registered after fully_shard's own hooks, sees what stays gathered.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.at_rest: set[int] = set()
        self.bytes = 0
        self.handle: RemovableHandle | None = None

    def arm(self, on: bool) -> None:
        """Watch the next forward; what is stored at rest now (the shards) is not counted as gathered.

        The hook exists only while armed: a module with a forward hook leaves nn.Module's fast
        call path, which every other step would pay for."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if on:
            self.at_rest = {local_tensor(p).untyped_storage().data_ptr() for p in self.model.parameters()}
            self.handle = self.model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, output: object) -> None:
        seen = set(self.at_rest)
        # Unsharded parameters that are DTensors still (TP's, EP's experts) count by their local
        # storage: the shards at rest are in `seen` already.
        self.bytes = max(self.bytes, storage_bytes(module.parameters(), seen))


def cuda_devices(device: torch.device, devices_per_rank: int) -> list[int]:
    """The GPUs this rank computes on: its own, or all of them under nn.DataParallel."""
    return list(range(devices_per_rank)) if devices_per_rank > 1 else [device.index or 0]


def reset_peak_memory(device: torch.device, devices_per_rank: int = 1) -> None:
    """Start a new peak: torch's counts from process start, i.e. from the unsharded model setup built."""
    if device.type == "cuda":
        for d in cuda_devices(device, devices_per_rank):
            torch.cuda.reset_peak_memory_stats(d)


def peak_memory_bytes(device: torch.device, devices_per_rank: int = 1) -> dict[str, int]:
    """Peak since the last reset: CUDA allocated and reserved (the largest of the rank's GPUs), or CPU RSS."""
    if device.type == "cuda":
        devices = cuda_devices(device, devices_per_rank)
        return {
            "mem/cuda_peak_allocated_bytes": max(torch.cuda.max_memory_allocated(d) for d in devices),
            "mem/cuda_peak_reserved_bytes": max(torch.cuda.max_memory_reserved(d) for d in devices),
        }
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mem/peak_rss_bytes": kb * (1 if sys.platform == "darwin" else 1024)}
