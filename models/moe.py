"""A mixture of SwiGLU experts with top-k routing, dropless, and its load-balancing loss.

Dropless: every token reaches its top_k experts, whatever the others do (no capacity factor), so
a token's output depends on that token alone and any split of a batch over ranks computes what
one process computes. The auxiliary loss is Switch Transformer's (experts × Σ_e f_e·P_e, f_e the
share of routing slots expert e receives, P_e its mean router probability) taken per sample and
averaged over the batch: like the cross-entropy, a mean of per-sample terms, so averaging it over
data-parallel ranks gives the same value and gradient as one process on the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.swiglu import FeedForward


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden) for _ in range(experts))
        self.last_aux: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        n_experts = len(self.experts)
        logits = self.router(x)
        # At least fp32 under bf16 autocast, as routers are computed; fp64 stays fp64.
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # (b, s, experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (b, s, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)  # top-k renormalised, as Mixtral
        self.last_aux = load_balance(probs, chosen)

        # Group the (token, expert) pairs by expert; each expert runs once on its tokens.
        expert_of = chosen.reshape(-1)
        order = expert_of.argsort(stable=True)
        token_of = order // self.top_k
        counts = _counts(expert_of, n_experts)
        tokens = x.reshape(b * s, d)
        parts = tokens[token_of].split(counts)
        # Every expert runs, on no tokens if none chose it, so each has a gradient on every rank
        # (DDP and FSDP expect one from every parameter).
        out = torch.cat([expert(part) for expert, part in zip(self.experts, parts, strict=True)])
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(tokens, dtype=out.dtype).index_add_(0, token_of, out).view(b, s, d)


def load_balance(probs: Tensor, chosen: Tensor) -> Tensor:
    """Switch Transformer's load-balancing loss per sample, averaged over the batch: probs
    (b, s, experts) the router's, chosen (b, s, k) the experts each token was sent to."""
    n_experts, top_k = probs.shape[-1], chosen.shape[-1]
    slots = torch.zeros_like(probs).scatter_add_(-1, chosen, torch.ones_like(chosen, dtype=probs.dtype))
    f = slots.mean(dim=1) / top_k  # (b, experts): each expert's share of the sample's routing slots
    return (n_experts * (f * probs.mean(dim=1)).sum(dim=-1)).mean()


def _counts(expert_of: Tensor, n_experts: int) -> list[int]:
    """Tokens per expert (a host sync: dropless routing sizes each expert's batch by its tokens).
    On the meta device, where routing is unknown, an even split stands in: FLOPs, memory and
    shapes counted there do not depend on it, since every token reaches top_k experts whatever
    the split."""
    if expert_of.is_meta:
        n = expert_of.numel()
        return [n // n_experts + (e < n % n_experts) for e in range(n_experts)]
    return torch.bincount(expert_of, minlength=n_experts).tolist()
