"""Activation memory, predicted: Korthikanti et al. (2022)'s per-layer count, adapted to paralab's models.

Korthikanti, Casper et al., "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), §4: one GPT layer keeps s·b·h·(34 + 5·a·s/h) bytes at 16-bit, of which
34·s·b·h are the layer's tensors in h (LayerNorm inputs, QKV input, Q and K, V, the attention
output, the MLP's input, its 4h GeLU input and output, dropout masks) and 5·a·s²·b the attention
scores. docs/memory.md derives each term below from it. What changes here:
- attention is torch's fused SDPA (flash on CPU): it keeps Q, K, V, its output and a logsumexp
  per head and position, never the s×s scores: the 5·a·s/h term is gone, a·s·b (4 bytes) comes in;
- no dropout: the masks' 2·s·b·h bytes are gone;
- every term in the activation dtype's bytes e (4 in fp32), not 2: 34 → 16·e per s·b·h for
  the GPT (h: LayerNorm in, its output into QKV, Q, K, V, attention out, LayerNorm in, its
  output into the MLP: 8h; the MLP's GeLU input and output: 2·4h);
- tensor parallelism divides what lives inside the Megatron regions by t; sequence parallelism
  divides the norms' share by t too, and torch's column-parallel linear keeps its all-gathered
  input (s·b·h, whole), as the paper's §4.2.2 also notes;
- full recomputation keeps a block's input only (the paper's 2·s·b·h); selective keeps what the
  policy in parallel/levers.py saves: the matmul and attention outputs (not the paper's selective
  recomputation, which recomputes attention's core and keeps the rest).
Counts are elements per token (per sample for the MLP and CNN); int64 ones (token ids, routing
indices) count 8 bytes. The numbers are exact for paralab's own models in fp32 (tests/test_memory.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from data.spec import DataSpec
from experiments.config.schema import AC, Config

FP32 = 4
INT64 = 8


def korthikanti_layer_bytes(
    s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False, ac: str = "none"
) -> float:
    """The paper's activation bytes of one transformer layer at 16-bit (Eqs. 1-3 and §5's table):
    no parallelism sbh(34 + 5as/h); TP sbh(10 + 24/t + 5as/(ht)); TP+SP sbh/t·(34 + 5as/h);
    full recomputation 2sbh (2sbh/t with SP); selective: the 5as/h term recomputed."""
    scores = 0.0 if ac == "selective" else 5 * a * s / h
    if ac == "full":
        return 2 * s * b * h / (t if sp else 1)
    if sp:
        return s * b * h * (34 + scores) / t
    return s * b * h * (10 + (24 + scores) / t)


@dataclass(frozen=True)
class Shape:
    """What one micro-step keeps, in bytes per token (per sample for non-sequence models)."""

    block: dict[AC, float]  # one block, by how it is checkpointed
    stem: float
    head: float


def _e(cfg: Config) -> int:
    """Bytes of an activation: the parameters' dtype, or bf16 under autocast (norm statistics,
    logsumexp and the loss's log-softmax stay fp32)."""
    return {"fp64": 8, "bf16": 2}.get(cfg.train.precision, 4)


def _gpt(cfg: Config, data: DataSpec, t: int, sp: bool) -> Shape:
    m, e = cfg.model, _e(cfg)
    h, a = m.get("hidden"), m.get("heads")
    f = m.get("ffn_mult") * h
    r = t if sp else 1  # what sequence parallelism splits along the sequence
    return Shape(
        block={
            # Two LayerNorms' inputs (and mean, rstd), their outputs into QKV and the MLP (whole:
            # gathered under SP); Q, K, V, attention out (+ logsumexp); GeLU in and out.
            AC.none: e * (2 * h / r + 2 * h + (4 * h + 2 * f) / t) + FP32 * (4 / r + a / t),
            # The block's input; Q, K, V, attention out, w1 out; wo and w2 out (partial sums:
            # whole on every TP rank).
            AC.selective: e * (h / r + (4 * h + f) / t + 2 * h) + FP32 * a / t,
            AC.full: e * h / r,
        },
        stem=INT64,  # token ids
        head=e * 2 * h + FP32 * (2 + data.vocab_size) + INT64,  # norm in, out, stats; log-softmax; targets
    )


def _llama(cfg: Config, data: DataSpec, t: int, sp: bool) -> Shape:
    m, e = cfg.model, _e(cfg)
    h, a = m.get("hidden"), m.get("heads")
    kv = m.get("kv_heads") or a
    f = m.get("multiple_of") * math.ceil(int(2 * m.get("ffn_mult") * h / 3) / m.get("multiple_of"))
    experts, k = m.get("experts", 0), m.get("top_k", 1)
    r = t if sp else 1
    # Each RMSNorm: its input and the normalised input (and rsqrt), the weighted output into the
    # next linear; attention: rotated Q, K and V repeated to every head, its output (+ logsumexp).
    common = e * (4 * h / r + 2 * h + 4 * h / t) + FP32 * (2 / r + a / t)
    # input; wq, wk, wv, attention out (+ logsumexp); wo (partial sums: whole on every TP rank)
    kept_attn = e * (h / r + (2 * h + 2 * kv * (h // a)) / t + h) + FP32 * a / t
    if experts:
        # Router probabilities, top-k weights and their sum, each token's k copies gathered,
        # concatenated and weighted; SwiGLU's four per expert token; three int64 routing indices.
        ffn = e * (experts + 2 * k + 1 + 3 * k * h + 4 * k * f) + INT64 * 3 * k
        kept_ffn = e * (experts + k * (2 * f + h))  # router logits; w1, w3, w2 per expert token
    else:
        # w1 out, silu out, w3 out, their product; kept: w1, w3, w2 out
        ffn, kept_ffn = e * 4 * f / t, e * (2 * f / t + h)
    return Shape(
        block={AC.none: common + ffn, AC.selective: kept_attn + kept_ffn, AC.full: e * h / r},
        stem=INT64,
        head=e * 3 * h + FP32 * (1 + data.vocab_size) + INT64,
    )


def _mlp(cfg: Config, data: DataSpec, t: int, sp: bool) -> Shape:
    m, e = cfg.model, _e(cfg)
    h = m.get("hidden")
    f = m.get("ffn_mult") * h
    return Shape(
        block={
            AC.none: e * (2 * h + 2 * f / t) + FP32 * 2,  # LayerNorm in (+ stats) and out, GeLU in and out
            AC.selective: e * (2 * h + f / t),  # input, fc1 out, fc2 out
            AC.full: e * h,
        },
        stem=e * math.prod(data.input_shape),  # the flattened input into the first linear
        head=e * 2 * h + FP32 * (2 + data.num_classes) + INT64,
    )


PER_TOKEN = {"models.transformer.Transformer": _gpt, "models.llama.Llama": _llama}
PER_SAMPLE = {"models.mlp.MLP": _mlp}


def predicted_activation_bytes(
    cfg: Config,
    data: DataSpec,
    samples: float,
    blocks: Sequence[int],
    stem: bool = True,
    head: bool = True,
    t: int = 1,
) -> float | None:
    """Bytes autograd keeps for one micro-step of `samples` samples on a rank that holds the
    blocks at these positions of the model (and its stem and head where it does), under TP
    degree t; None where not predicted."""
    target = cfg.model.target
    shape_of = PER_TOKEN.get(target) or PER_SAMPLE.get(target)
    if shape_of is None:
        return None
    shape = shape_of(cfg, data, t, cfg.strategy.sequence_parallel and t > 1)
    units = samples * (data.seq_len if target in PER_TOKEN else 1)
    ac = AC(cfg.train.ac)
    every = cfg.train.ac_every
    chosen = sum(1 for i in blocks if ac != AC.none and (i + 1) % every == 0)  # as parallel/levers.py picks
    total = chosen * shape.block[ac] + (len(blocks) - chosen) * shape.block[AC.none]
    return units * (total + (shape.stem if stem else 0.0) + (shape.head if head else 0.0))
