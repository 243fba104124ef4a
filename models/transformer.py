"""GPT-style decoder: token + position embedding, pre-norm blocks (causal attention + MLP), norm, head.

Its tensor-parallel plan (models/tp.py) and pipeline split points (the blocks) are declared here.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from experiments.config.schema import ConfigError
from models.attention import CausalAttention, ReadsPositions
from models.staged import StagedModel
from models.tp import decoder_block_plan, sequence_parallel_edges


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)
        self.core = CausalAttention()

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds heads/tp of them.
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        return self.wo(self.core(q, k, v).transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, ffn)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Embedding(ReadsPositions, nn.Module):
    def __init__(self, vocab: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.tok(ids) + self.pos(self.token_positions(ids.shape[1], ids.device))


class Transformer(StagedModel):
    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        hidden: int,
        layers: int,
        heads: int,
        ffn_mult: int,
        max_seq_len: int,
    ) -> None:
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"model.hidden={hidden} is not divisible by model.heads={heads}")
        self.stem = Embedding(vocab_size, hidden, max(max_seq_len, seq_len))
        self.blocks = nn.ModuleDict({str(i): Block(hidden, heads, ffn_mult * hidden) for i in range(layers)})
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, vocab_size, bias=False))
        self.sizes = [
            ("model.hidden", hidden),
            ("the MLP width ffn_mult×hidden", ffn_mult * hidden),
            ("model.heads", heads),
        ]

    def tp_divisors(self) -> list[tuple[str, int]]:
        return self.sizes

    def tp_plan(self, sequence_parallel: bool) -> dict[str, object]:
        return decoder_block_plan(
            attention_in=("attention.wq", "attention.wk", "attention.wv"),
            attention_out="attention.wo",
            ffn_in=("feed_forward.w1",),
            ffn_out="feed_forward.w2",
            norms=("attention_norm", "ffn_norm"),
            sequence_parallel=sequence_parallel,
        )

    def sequence_parallel_edges(self) -> dict[str, object]:
        return sequence_parallel_edges()
