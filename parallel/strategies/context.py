"""Context parallelism: each rank of a cp group holds 1/cp of every sequence; attention is a ring.

Each sequence is cut into 2·cp chunks and rank r keeps chunks r and 2·cp − 1 − r, a head and a
tail: under the causal mask early chunks attend to little and late ones to much, so every rank
gets the same work (the load balancing of torch's context_parallel and Megatron's).

Attention passes each rank's K/V block around the ring, one hop per step, while the rank attends
to the block it holds; partial results merge by their log-sum-exp (the online softmax of flash
attention). Backward passes K/V around again, with their gradients travelling beside them, and
each block's gradient arrives home after cp hops.

On CUDA torch's own `context_parallel` swaps scaled_dot_product_attention for its ring. On CPU
torch 2.14.1's has no sharding rule for aten._scaled_dot_product_flash_attention_for_cpu, so the
ring is written here on torch.distributed's P2P (batch_isend_irecv), forward and backward, as
picotron writes it in plain torch; tests/test_context.py proves it equal to SDPA on one process.
Everything else of the model is position-wise, so only the positions and attention change.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.nn.functional import all_reduce

from models.attention import CausalAttention, ReadsPositions, ReadsWholeSequence
from parallel.base import Parallelized


def head_tail(seq_len: int, cp: int, rank: int) -> Tensor:
    """The positions rank `rank` of `cp` holds: chunks rank and 2·cp − 1 − rank of 2·cp."""
    c = seq_len // (2 * cp)
    head, tail = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(head, head + c), torch.arange(tail, tail + c)])


class Ring:
    """This rank's neighbours in its cp group: it sends to the next and receives from the previous."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, n, r = group, group.size(), group.rank()
        self.size, self.rank = n, r
        self.next = dist.get_global_rank(group, (r + 1) % n)
        self.prev = dist.get_global_rank(group, (r - 1) % n)

    def shift(self, t: Tensor) -> Callable[[], Tensor]:
        """Start sending `t` on and receiving the previous rank's; the returned call waits for it."""
        recv = torch.empty_like(t)
        works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, t.contiguous(), self.next, self.group),
                dist.P2POp(dist.irecv, recv, self.prev, self.group),
            ]
        )

        def wait() -> Tensor:
            for w in works:
                w.wait()
            return recv

        return wait


def _repeat(t: Tensor, repeats: int) -> Tensor:
    return t.repeat_interleave(repeats, dim=1) if repeats > 1 else t


def _scores(q: Tensor, k: Tensor, mask: Tensor, acc: torch.dtype) -> Tensor:
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * q.shape[-1] ** -0.5
    return s.masked_fill(~mask, float("-inf"))


def _probs(s: Tensor, lse: Tensor, mask: Tensor) -> Tensor:
    # Rows with no allowed key here have lse = -inf: their 0/0 becomes 0 by the mask.
    return torch.exp(s - lse.unsqueeze(-1)).masked_fill(~mask, 0.0)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions: Tensor, ring: Ring, repeats: int):  # type: ignore[override]
        # Its own precision, at least fp32: bf16 autocast would round the scores and the merge.
        with torch.autocast(q.device.type, enabled=False):
            return _RingAttention._forward(ctx, q, k, v, positions, ring, repeats)

    @staticmethod
    def _forward(ctx, q, k, v, positions: Tensor, ring: Ring, repeats: int) -> Tensor:
        acc = torch.promote_types(q.dtype, torch.float32)
        here = positions[ring.rank]
        kv = torch.stack([k, v])
        out = lse = None
        for step in range(ring.size):
            pending = ring.shift(kv) if step < ring.size - 1 else None
            mask = here[:, None] >= positions[(ring.rank - step) % ring.size][None, :]
            if mask.any():
                s = _scores(q, _repeat(kv[0], repeats), mask, acc)
                l_blk = torch.logsumexp(s, dim=-1)
                o_blk = _probs(s, l_blk, mask) @ _repeat(kv[1], repeats).to(acc)
                if out is None:  # the rank's own block: every token sees itself, so lse is finite
                    out, lse = o_blk, l_blk
                else:
                    new = torch.logaddexp(lse, l_blk)
                    out = out * torch.exp(lse - new).unsqueeze(-1) + o_blk * torch.exp(l_blk - new).unsqueeze(
                        -1
                    )
                    lse = new
            if pending is not None:
                kv = pending()
        ctx.save_for_backward(q, k, v, out, lse, positions)
        ctx.ring, ctx.repeats = ring, repeats
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse, positions = ctx.saved_tensors
        ring, repeats = ctx.ring, ctx.repeats
        acc = out.dtype
        b, h, sq, d = q.shape
        here = positions[ring.rank]
        dout = dout.to(acc)
        delta = (dout * out).sum(-1, keepdim=True)
        dq = torch.zeros_like(q, dtype=acc)
        kv = torch.stack([k, v])
        dkv = torch.zeros_like(kv, dtype=acc)
        scale = d**-0.5
        for step in range(ring.size):
            pending = ring.shift(kv) if step < ring.size - 1 else None
            mask = here[:, None] >= positions[(ring.rank - step) % ring.size][None, :]
            if mask.any():
                kr, vr = _repeat(kv[0], repeats).to(acc), _repeat(kv[1], repeats).to(acc)
                p = _probs(_scores(q, kr, mask, acc), lse, mask)
                ds = p * (dout @ vr.transpose(-2, -1) - delta)
                dq += (ds @ kr) * scale
                dk = (ds.transpose(-2, -1) @ q.to(acc)) * scale
                dv = p.transpose(-2, -1) @ dout
                if repeats > 1:  # each kv head's gradient: the sum over the query heads it served
                    dk = dk.unflatten(1, (-1, repeats)).sum(2)
                    dv = dv.unflatten(1, (-1, repeats)).sum(2)
                dkv = dkv + torch.stack([dk, dv])
            # The block's gradient goes on with the block; after cp hops it is home, whole.
            grads = ring.shift(dkv)
            if pending is not None:
                kv = pending()
            dkv = grads()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


class RingAttention(CausalAttention):
    """CausalAttention over a sequence split head-tail across a cp group (class-swapped in)."""

    ring: Ring
    positions: Tensor  # (cp, seq_len / cp): every rank's positions, for the mask of each block

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _RingAttention.apply(q, k, v, self.positions, self.ring, self.repeats)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, seq_len: int, device: torch.device) -> Callable:
    """Give every position-reading module this rank's positions and make attention a ring; the
    returned function then splits each batch's sequences for the strategy applied in between."""
    cp, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    every = torch.stack([head_tail(seq_len, cp, r) for r in range(cp)]).to(device)
    mine = every[rank]
    torch_ring = device.type == "cuda"
    ring = None if torch_ring else Ring(cp_mesh.get_group())
    group = cp_mesh.get_group()
    for m in model.modules():
        if isinstance(m, ReadsPositions):
            m.positions = mine
        if isinstance(m, ReadsWholeSequence):
            # Every rank holds as many tokens of each sequence: the whole's mean is the mean of
            # the ranks' means. The reduction's backward sums the ranks' gradients, which is
            # what each rank's share of a loss term that every rank adds needs.
            m.whole_sequence_mean = lambda t: all_reduce(t, group=group) / cp
        if isinstance(m, CausalAttention) and not torch_ring:
            m.__class__ = RingAttention
            m.ring, m.positions = ring, every  # type: ignore[attr-defined]

    def split(t: Tensor) -> Tensor:
        return t.index_select(1, mine)

    def around(par: Parallelized) -> Parallelized:
        inner, inner_eval = par.forward_backward, par.eval_forward
        attention: Callable[[], AbstractContextManager] = (
            (lambda: _torch_context_parallel(cp_mesh)) if torch_ring else nullcontext
        )

        def forward_backward(x: Tensor, y: Tensor, scale: float, sync: bool) -> Tensor | None:
            with attention():
                return inner(split(x), split(y), scale, sync)

        def eval_forward(x: Tensor, y: Tensor) -> Tensor | None:
            with attention():
                return inner_eval(split(x), split(y))  # type: ignore[misc]

        par.forward_backward, par.eval_forward, par.local_targets = forward_backward, eval_forward, split
        return par

    return around


def _torch_context_parallel(cp_mesh: DeviceMesh) -> AbstractContextManager:
    """torch's ring for scaled_dot_product_attention on CUDA. The sequences come in already split
    head-tail (apply_cp), the layout its causal load balancing (on by default) expects, so no
    buffer is handed to it to shard."""
    from torch.distributed.tensor.experimental import context_parallel

    return context_parallel(cp_mesh)
