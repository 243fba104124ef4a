"""What a strategy leaves on this rank: its local shards, their bytes, and the evidence that it
sharded what it claims (read by the sharding proofs, the memory meter and the cost model)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard


def local_tensor(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def storage_bytes(tensors: Iterable[Tensor | None], seen: set[int] | None = None) -> int:
    """Bytes of the distinct local storages behind `tensors` (views and shared storage count once)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None:
            continue
        s = local_tensor(t).untyped_storage()
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


def split_shapes(params: Iterable[Tensor], mesh_dim: str) -> tuple[tuple[int, ...], ...]:
    """These parameters' shapes on this rank as the split over `mesh_dim` alone leaves them."""
    shapes = []
    for p in params:
        shape = list(p.shape)
        for name, dim, ways in _splits(p):
            if name == mesh_dim:
                shape[dim] //= ways
        shapes.append(tuple(shape))
    return tuple(shapes)


def tp_local_shapes(params: Iterable[Tensor]) -> tuple[tuple[int, ...], ...]:
    """These parameters' shapes on this rank as tensor parallelism leaves them (before any FSDP sharding)."""
    return split_shapes(params, "tp")


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
        local += local_tensor(p).numel()
        full += p.numel()
        for mesh_dim, _, _ in _splits(p):
            sharded[mesh_dim] += p.numel()
    owned = sum(local_tensor(p).numel() for g in local_optimizer(opt).param_groups for p in g["params"])
    blocks = getattr(model, "blocks", None)
    return {
        **_sequence_and_experts(model),
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


def _sequence_and_experts(model: nn.Module) -> dict[str, Any]:
    """Which positions of each sequence this rank computes (context parallelism), and which
    experts of each mixture it holds (expert parallelism: from the experts' DTensor placement
    over the ep mesh dim)."""
    from models.attention import ReadsPositions
    from models.moe import GroupedExperts

    positions = next(
        (m.positions for m in model.modules() if isinstance(m, ReadsPositions) and m.positions is not None),
        None,
    )
    experts: list[int] | None = None
    for m in model.modules():
        if not isinstance(m, GroupedExperts):
            continue
        w = m.w1
        names = (w.device_mesh.mesh_dim_names or ()) if isinstance(w, DTensor) else ()
        if "ep" not in names:
            experts = list(range(m.count))
            break
        ep_dim = names.index("ep")
        per = m.count // w.device_mesh.size(ep_dim)
        c = w.device_mesh.get_local_rank(ep_dim)
        experts = list(range(c * per, (c + 1) * per))
        break
    return {
        "sequence_positions": positions.tolist() if positions is not None else None,
        "experts": experts,
    }
