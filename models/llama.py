"""Llama-3-style decoder, as torchtitan's llama3: token embedding, pre-norm blocks (RMSNorm,
grouped-query attention with rotary positions, SwiGLU feed-forward), RMSNorm, an untied output.

Its tensor-parallel plan (models/tp.py: the query and the kv heads split over the TP ranks) and
its pipeline split points (the blocks) are declared here, beside the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from experiments.config.schema import ConfigError
from models.attention import CausalAttention, ReadsPositions
from models.moe import MoE
from models.staged import StagedModel
from models.swiglu import FeedForward, ffn_hidden
from models.tp import decoder_block_plan, sequence_parallel_edges


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of position × frequency, (seq_len, head_dim / 2): frequency i is theta^(-2i/d)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x (batch, seq, heads, head_dim): each (even, odd) pair of features
    turned by its position's angle."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class Attention(ReadsPositions, nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, max_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim = dim // heads
        # Query heads per kv head, on every TP rank alike.
        self.core = CausalAttention(repeats=heads // kv_heads)
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        cos, sin = rotary_tables(max_len, self.head_dim, theta)
        # Derived from the config, never trained: left out of checkpoints.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds heads/tp and kv_heads/tp of them.
        q, k, v = (w(x).view(b, s, -1, self.head_dim) for w in (self.wq, self.wk, self.wv))
        if self.positions is None:  # the tables' first rows, as views: nothing copied
            cos, sin = self.cos[:s], self.sin[:s]
        else:
            cos, sin = self.cos[self.positions], self.sin[self.positions]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return self.wo(self.core(q, k, v).transpose(1, 2).reshape(b, s, -1))


@dataclass(frozen=True)
class LlamaArgs:
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    max_len: int
    rope_theta: float
    norm_eps: float
    experts: int
    top_k: int


class Block(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(a.hidden, eps=a.norm_eps)
        self.attention = Attention(a.hidden, a.heads, a.kv_heads, a.max_len, a.rope_theta)
        self.ffn_norm = nn.RMSNorm(a.hidden, eps=a.norm_eps)
        self.feed_forward = (
            MoE(a.hidden, a.ffn_hidden, a.experts, a.top_k)
            if a.experts
            else FeedForward(a.hidden, a.ffn_hidden)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(StagedModel):
    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        hidden: int,
        layers: int,
        heads: int,
        kv_heads: int,
        ffn_mult: int,
        multiple_of: int,
        rope_theta: float,
        norm_eps: float,
        max_seq_len: int,
        experts: int = 0,
        top_k: int = 1,
        aux_loss_coef: float = 0.01,
        ffn_dim_multiplier: float = 1.0,  # Llama 3's: 1.3 widens 8B's and 70B's feed-forward
    ) -> None:
        super().__init__()
        kv_heads = kv_heads or heads  # 0: one kv head per query head (plain multi-head attention)
        _check(hidden, heads, kv_heads, experts, top_k)
        a = LlamaArgs(
            hidden,
            heads,
            kv_heads,
            ffn_hidden(hidden, ffn_mult, multiple_of, ffn_dim_multiplier),
            max(max_seq_len, seq_len),
            rope_theta,
            norm_eps,
            experts,
            top_k,
        )
        self.stem = nn.Embedding(vocab_size, hidden)
        self.blocks = nn.ModuleDict({str(i): Block(a) for i in range(layers)})
        self.head = nn.Sequential(nn.RMSNorm(hidden, eps=norm_eps), nn.Linear(hidden, vocab_size, bias=False))
        self.aux_loss_coef = aux_loss_coef
        self.moe = [
            block.feed_forward for block in self.blocks.values() if isinstance(block.feed_forward, MoE)
        ]
        self.sizes = [
            ("model.heads", heads),
            ("model.kv_heads", kv_heads),
            ("the SwiGLU width", a.ffn_hidden),
        ]

    def tp_plan(self, sequence_parallel: bool) -> dict[str, object] | None:
        # Read off the blocks: a pipeline stage, which holds some of them, calls this too.
        if any(isinstance(b.feed_forward, MoE) for b in self.blocks.values()):
            return None  # experts are split by expert parallelism, not by a Megatron plan
        return decoder_block_plan(
            attention_in=("attention.wq", "attention.wk", "attention.wv"),
            attention_out="attention.wo",
            ffn_in=("feed_forward.w1", "feed_forward.w3"),
            ffn_out="feed_forward.w2",
            norms=("attention_norm", "ffn_norm"),
            sequence_parallel=sequence_parallel,
        )

    def tp_divisors(self) -> list[tuple[str, int]]:
        return self.sizes

    def sequence_parallel_edges(self) -> dict[str, object]:
        return sequence_parallel_edges()

    def aux_loss(self) -> Tensor | None:
        """The routers' load-balancing loss of the last forward, summed over the layers."""
        if not self.moe:
            return None
        terms = [m.last_aux for m in self.moe if m.last_aux is not None]
        if not terms:  # before the first forward: the model has one, worth nothing yet
            return torch.zeros((), device=self.head[1].weight.device)
        return self.aux_loss_coef * torch.stack(terms).sum()


def _check(hidden: int, heads: int, kv_heads: int, experts: int, top_k: int) -> None:
    if hidden % heads:
        raise ConfigError(f"model.hidden={hidden} is not divisible by model.heads={heads}")
    if heads % kv_heads:
        raise ConfigError(
            f"model.kv_heads={kv_heads} must divide model.heads={heads} (each kv head serves "
            "as many query heads as every other)"
        )
    if (hidden // heads) % 2:
        raise ConfigError(
            f"model.hidden / model.heads = {hidden // heads} must be even: rotary positions turn pairs of features"
        )
    if experts and not 1 <= top_k <= experts:
        raise ConfigError(f"model.top_k={top_k} must be between 1 and model.experts={experts}")
