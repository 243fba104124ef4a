"""A mixture of SwiGLU experts with top-k routing, dropless, and its load-balancing loss.

Dropless: every token reaches its top_k experts, whatever the others do (no capacity factor), so
a token's output depends on that token alone and any split of a batch over ranks computes what
one process computes. The auxiliary loss is Switch Transformer's (experts × Σ_e f_e·P_e, f_e the
share of routing slots expert e receives, P_e its mean router probability) taken per sample and
averaged over the batch: like the cross-entropy, a mean of per-sample terms, so averaging it over
data-parallel ranks gives the same value and gradient as one process on the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from models.attention import ReadsWholeSequence


class GroupedExperts(nn.Module):
    """`experts` SwiGLU feed-forwards, w2(silu(w1 x) · w3 x), with each weight stacked over the
    experts (dim 0): expert parallelism splits them there, a DTensor sharded over the ep ranks
    (parallel/strategies/expert.py), and checkpoints keep one tensor per weight whatever the split."""

    def __init__(self, dim: int, hidden: int, experts: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(experts, hidden, dim))
        for w in (self.w1, self.w2, self.w3):  # nn.Linear's default: U(±1/√fan_in)
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    @property
    def count(self) -> int:
        return self.w1.shape[0]

    def local_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The weights of the experts this rank computes: all of them, or its ep share."""
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3))  # type: ignore[return-value]

    def run(self, tokens: Tensor, counts: list[int]) -> Tensor:
        """Each local expert on its run of `tokens` (grouped by expert, counts[e] of expert e's)."""
        w1, w2, w3 = self.local_weights()
        parts = tokens.split(counts)
        # Every expert runs, on no tokens if none chose it, so each has a gradient on every rank
        # (DDP and FSDP expect one from every parameter).
        return torch.cat(
            [F.linear(F.silu(F.linear(p, w1[e])) * F.linear(p, w3[e]), w2[e]) for e, p in enumerate(parts)]
        )

    def forward(self, tokens: Tensor, counts: list[int]) -> Tensor:
        return self.run(tokens, counts)


class MoE(ReadsWholeSequence, nn.Module):
    def __init__(self, dim: int, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = GroupedExperts(dim, hidden, experts)
        self.last_aux: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        n_experts = self.experts.count
        logits = self.router(x)
        # At least fp32 under bf16 autocast, as routers are computed; fp64 stays fp64.
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # (b, s, experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (b, s, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)  # top-k renormalised, as Mixtral
        self.last_aux = load_balance(probs, chosen, self.whole_sequence_mean)

        # Group the (token, expert) pairs by expert; each expert runs once on its tokens.
        expert_of = chosen.reshape(-1)
        order = expert_of.argsort(stable=True)
        token_of = order // self.top_k
        counts = _counts(expert_of, n_experts)
        tokens = x.reshape(b * s, d)
        out = self.experts(tokens[token_of], counts)
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(tokens, dtype=out.dtype).index_add_(0, token_of, out).view(b, s, d)


def load_balance(probs: Tensor, chosen: Tensor, whole: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Switch Transformer's load-balancing loss per sample, averaged over the batch: probs
    (b, s, experts) the router's, chosen (b, s, k) the experts each token was sent to. `whole`
    turns means over this rank's part of each sequence into means over the whole sequence
    (context parallelism: ReadsWholeSequence)."""
    n_experts, top_k = probs.shape[-1], chosen.shape[-1]
    slots = torch.zeros_like(probs).scatter_add_(-1, chosen, torch.ones_like(chosen, dtype=probs.dtype))
    means = torch.stack([slots.mean(dim=1), probs.mean(dim=1)])  # (2, b, experts)
    if whole is not None:
        means = whole(means)
    f = means[0] / top_k  # (b, experts): each expert's share of the sample's routing slots
    return (n_experts * (f * means[1]).sum(dim=-1)).mean()


def _counts(expert_of: Tensor, n_experts: int) -> list[int]:
    """Tokens per expert (a host sync: dropless routing sizes each expert's batch by its tokens).
    On the meta device, where routing is unknown, an even split stands in: FLOPs, memory and
    shapes counted there do not depend on it, since every token reaches top_k experts whatever
    the split."""
    if expert_of.is_meta:
        n = expert_of.numel()
        return [n // n_experts + (e < n % n_experts) for e in range(n_experts)]
    return torch.bincount(expert_of, minlength=n_experts).tolist()
