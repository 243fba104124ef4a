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
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from experiments.theory import ring_bytes

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


def _group_size(args: tuple) -> int:
    """Size of the process group an op runs on: c10d ops carry it boxed, functional ones by name."""
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a).size()
            except (RuntimeError, TypeError):
                continue  # the ReduceOp is boxed the same way
        if isinstance(a, str):
            try:
                return dist.distributed_c10d._resolve_process_group(a).size()
            except (KeyError, ValueError, RuntimeError):
                continue
    return 1


class CommCounter(TorchDispatchMode):
    """Counts c10d collectives: calls, payload bytes S, and ring-model bytes sent by this rank."""

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
                n = _group_size(tuple(args) + tuple((kwargs or {}).values()))
                self.calls[collective] += 1
                self.bytes[collective] += size
                self.wire[collective] += (
                    ring_bytes(collective, size, n) if collective != "all_to_all" else size
                )
        return func(*args, **(kwargs or {}))

    def scalars(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in sorted(self.calls):
            out[f"comm/{c}_calls"] = self.calls[c]
            out[f"comm/{c}_bytes"] = self.bytes[c]
            out[f"comm/{c}_wire_bytes"] = self.wire[c]
        out["comm/total_wire_bytes"] = sum(self.wire.values())
        return out


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def storage_bytes(tensors: Iterable[Tensor | None], seen: set[int] | None = None) -> int:
    """Bytes of the distinct local storages behind `tensors` (views and shared storage count once)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None:
            continue
        s = _local(t).untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def _splits(p: Tensor) -> Iterable[tuple[str, int, int]]:
    """(mesh dim name, tensor dim, ways) for each mesh dim of size > 1 that splits p."""
    if not isinstance(p, DTensor):
        return
    names = p.device_mesh.mesh_dim_names or ()
    for i, placement in enumerate(p.placements):
        # FSDP over TP-sharded parameters shards them again as _StridedShard (not a Shard).
        if (placement.is_shard() or isinstance(placement, _StridedShard)) and p.device_mesh.size(i) > 1:
            yield (names[i] if i < len(names) else str(i)), placement.dim, p.device_mesh.size(i)  # type: ignore[attr-defined]


def tp_local_shapes(params: Iterable[Tensor]) -> tuple[tuple[int, ...], ...]:
    """These parameters' shapes on this rank as tensor parallelism leaves them (before any FSDP sharding)."""
    shapes = []
    for p in params:
        shape = list(p.shape)
        for mesh_dim, dim, ways in _splits(p):
            if mesh_dim == "tp":
                shape[dim] //= ways
        shapes.append(tuple(shape))
    return tuple(shapes)


# layout()'s name for parameters that DeepSpeed partitions over the data-parallel ranks itself.
DS_PARTITION = "deepspeed"


def layout(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What this rank really holds: the evidence that a strategy sharded what it claims to.

    Elements stored here against the full size of the parameters present, the full size of those
    sharded over each named mesh dim, the optimizer's own parameters (ZeRO-1 owns a subset), and
    which blocks (plus stem, head) live on this rank.
    """
    local = full = 0
    sharded: dict[str, int] = defaultdict(int)
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            # DeepSpeed ZeRO-3 keeps only this rank's partition of p, padded to equal partitions.
            local += p.ds_tensor.numel()
            full += p.ds_numel
            sharded[DS_PARTITION] += p.ds_numel
            continue
        local += _local(p).numel()
        full += p.numel()
        for mesh_dim, _, _ in _splits(p):
            sharded[mesh_dim] += p.numel()
    owned = sum(_local(p).numel() for g in local_optimizer(opt).param_groups for p in g["params"])
    blocks = getattr(model, "blocks", None)
    return {
        "param_elements_local": local,
        "param_elements_full": full,
        "sharded_elements": dict(sharded),
        "optimizer_param_elements": owned,
        "blocks": list(blocks.keys()) if blocks is not None else [],
        "stem": getattr(model, "stem", None) is not None,
        "head": getattr(model, "head", None) is not None,
    }


def local_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # ZeroRedundancyOptimizer keeps this rank's shard of the state in an inner optimizer.
    return getattr(opt, "optim", opt)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    states = local_optimizer(opt).state.values()
    return storage_bytes(v for s in states for v in s.values() if isinstance(v, Tensor))


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
            self.at_rest = {_local(p).untyped_storage().data_ptr() for p in self.model.parameters()}
            self.handle = self.model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, output: object) -> None:
        seen = set(self.at_rest)
        self.bytes = max(
            self.bytes,
            storage_bytes((p for p in module.parameters() if not isinstance(p, DTensor)), seen),
        )


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
