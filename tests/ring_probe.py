"""Run under torchrun: ring attention over this job's ranks, against SDPA on the whole sequence.

Every rank draws the same q, k, v (one seed), computes causal SDPA and its gradients on the whole
sequence, and the ring on its head-tail share; its share of the output and of every gradient must
equal the whole's rows at its positions. Exit 1 naming the first tensor that differs.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.strategies.context import Ring, RingAttention, head_tail


def main() -> int:
    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    ring = Ring(dist.group.WORLD)  # type: ignore[arg-type]
    failures = []
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        for heads, kv_heads in ((4, 4), (4, 2)):
            g = torch.Generator().manual_seed(0)
            b, s, d = 2, 8 * cp, 8
            q = torch.randn(b, heads, s, d, generator=g, dtype=dtype, requires_grad=True)
            k = torch.randn(b, kv_heads, s, d, generator=g, dtype=dtype, requires_grad=True)
            v = torch.randn(b, kv_heads, s, d, generator=g, dtype=dtype, requires_grad=True)
            dout = torch.randn(b, heads, s, d, generator=g, dtype=dtype)
            r = heads // kv_heads
            whole = F.scaled_dot_product_attention(
                q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True
            )
            whole.backward(dout)
            mine = head_tail(s, cp, rank)
            attention = RingAttention(repeats=r)
            attention.ring, attention.positions = ring, torch.stack([head_tail(s, cp, i) for i in range(cp)])
            ql, kl, vl = (t.detach()[:, :, mine].requires_grad_() for t in (q, k, v))
            out = attention(ql, kl, vl)
            out.backward(dout[:, :, mine])
            for name, got, want in (
                ("out", out, whole[:, :, mine]),
                ("dq", ql.grad, q.grad[:, :, mine]),
                ("dk", kl.grad, k.grad[:, :, mine]),
                ("dv", vl.grad, v.grad[:, :, mine]),
            ):
                err = (got - want).abs().max().item()
                if not err <= tol * max(1.0, want.abs().max().item()):
                    failures.append(f"rank {rank}: {name} {dtype} kv_heads={kv_heads}: max error {err:.2e}")
    dist.destroy_process_group()
    for f in failures:
        print(f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
