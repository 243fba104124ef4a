"""Expert parallelism: each mixture's experts split over the ep ranks; tokens go to the rank that
holds their expert and come back by all-to-all (torchtitan's and Megatron's layout).

The ep ranks are data-parallel ranks (dp_shard split into dp_shard / ep × ep, parallel/mesh.py):
each routes its own tokens, sends every (token, expert) pair to the rank holding that expert, the
experts run on what arrives, and the outputs return the same way. Routing is dropless, so every
token meets the experts it chose whatever the split, and one process computes the same.

The stacked expert weights become DTensors sharded on dim 0 over ep; FSDP2 then shards them again
over the rest of dp_shard (and replicates them across dp_replicate), as its FSDP+EP path allows.
An expert's gradient sums the tokens of its whole ep group, while FSDP averages over the ranks
that shard it only: the weights pass backward 1/ep of their gradient, so the average is over
every data-parallel rank. (FSDP2's set_gradient_divide_factor says the same with a PREMUL_SUM
reduction, which gloo does not have.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from models.moe import GroupedExperts


def _expert_major(recv: list[list[int]]) -> list[int]:
    """Rows of what arrived (source rank by source rank, each in expert order) regrouped by expert."""
    starts, at = [], 0
    for row in recv:
        starts.append([])
        for n in row:
            starts[-1].append(at)
            at += n
    return [
        i
        for e in range(len(recv[0]))
        for src, row in enumerate(recv)
        for i in range(starts[src][e], starts[src][e] + row[e])
    ]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


class ExpertParallel(GroupedExperts):
    """GroupedExperts whose weights hold this rank's experts only (class-swapped in)."""

    group: dist.ProcessGroup

    def local_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        scale = 1.0 / self.group.size()
        return tuple(_ScaleGrad.apply(w, scale) for w in super().local_weights())  # type: ignore[return-value]

    def forward(self, tokens: Tensor, counts: list[int]) -> Tensor:
        ep = self.group.size()
        local = self.count // ep
        send = torch.tensor(counts, dtype=torch.int64, device=tokens.device)
        got = torch.empty_like(send)
        # How many tokens each rank sends each of this rank's experts (a host sync, as dropless
        # routing already is: every transfer is sized by the tokens routed).
        dist.all_to_all_single(got, send, group=self.group)
        recv = got.view(ep, local).tolist()
        send_per_rank = [sum(counts[r * local : (r + 1) * local]) for r in range(ep)]
        recv_per_rank = [sum(row) for row in recv]
        arrived = all_to_all_single_autograd(tokens, recv_per_rank, send_per_rank, self.group)
        order = torch.tensor(_expert_major(recv), dtype=torch.int64, device=tokens.device)
        out = self.run(arrived[order], [sum(col) for col in zip(*recv, strict=True)])
        back = torch.zeros_like(out).index_copy(0, order, out)
        return all_to_all_single_autograd(back, send_per_rank, recv_per_rank, self.group)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh, fsdp_kwargs: dict) -> None:
    """Split every GroupedExperts of `model` over the ep ranks, and FSDP-shard it over the mesh
    in `fsdp_kwargs` (parallel/mesh.py: expert_meshes)."""
    for m in model.modules():
        if not isinstance(m, GroupedExperts):
            continue
        for name, w in list(m.named_parameters(recurse=False)):
            # Every rank built the whole model from one seed: each keeps its slice, nothing sent.
            shard = distribute_tensor(w.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(m, name, nn.Parameter(shard, requires_grad=w.requires_grad))
        m.__class__ = ExpertParallel
        m.group = ep_mesh.get_group()  # type: ignore[attr-defined]
        fully_shard(m, **fsdp_kwargs)
