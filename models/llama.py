"""Llama-3-style decoder, as torchtitan's llama3: token embedding, pre-norm blocks (RMSNorm,
grouped-query attention with rotary positions, SwiGLU feed-forward), RMSNorm, an untied output.

Its tensor-parallel plan (models/tp.py: the query and the kv heads split over the TP ranks) and
its pipeline split points (the blocks) are declared here, beside the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.config.schema import ModelConfig
from models.staged import StagedModel
from models.tp import decoder_block_plan, sequence_parallel_edges


def ffn_hidden(dim: int, ffn_mult: int, multiple_of: int) -> int:
    """Llama's SwiGLU width: two thirds of ffn_mult·dim (the same parameters as a GELU MLP of
    ffn_mult·dim), rounded up to a multiple of `multiple_of`."""
    return multiple_of * math.ceil(int(2 * ffn_mult * dim / 3) / multiple_of)


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


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, max_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.repeats = heads // kv_heads  # query heads per kv head, on every TP rank alike
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
        q, k = rotate(q, self.cos[:s], self.sin[:s]), rotate(k, self.cos[:s], self.sin[:s])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        # Query head i reads kv head i // repeats.
        k, v = k.repeat_interleave(self.repeats, dim=1), v.repeat_interleave(self.repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int) -> None:
        super().__init__()
        dim = cfg.hidden
        self.attention_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.attention = Attention(dim, cfg.heads, kv_heads_of(cfg), max_len, cfg.rope_theta)
        self.ffn_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(dim, ffn_hidden(dim, cfg.ffn_mult, cfg.multiple_of))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


def kv_heads_of(cfg: ModelConfig) -> int:
    """model.kv_heads, where 0 means one kv head per query head (plain multi-head attention)."""
    return cfg.kv_heads or cfg.heads


class Llama(StagedModel):
    def __init__(self, vocab: int, seq_len: int, cfg: ModelConfig) -> None:
        super().__init__()
        max_len = max(cfg.max_seq_len, seq_len)
        self.stem = nn.Embedding(vocab, cfg.hidden)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, max_len) for i in range(cfg.layers)})
        self.head = nn.Sequential(
            nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps), nn.Linear(cfg.hidden, vocab, bias=False)
        )

    def tp_plan(self, sequence_parallel: bool) -> dict[str, object]:
        return decoder_block_plan(
            attention_in=("attention.wq", "attention.wk", "attention.wv"),
            attention_out="attention.wo",
            ffn_in=("feed_forward.w1", "feed_forward.w3"),
            ffn_out="feed_forward.w2",
            norms=("attention_norm", "ffn_norm"),
            sequence_parallel=sequence_parallel,
        )

    def sequence_parallel_edges(self) -> dict[str, object]:
        return sequence_parallel_edges()
