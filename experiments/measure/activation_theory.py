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
Counts are bytes per token (per sample for the MLP and CNN); int64 ones (token ids, routing
indices) count 8 bytes; bf16 autocast is in `Bytes`. Every block's count is exact for paralab's
own models in fp32, bf16 and fp64 (tests/test_memory.py).
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
    s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False, recompute: str = "none"
) -> float:
    """The paper's activation bytes of one transformer layer at 16-bit (Table 2): no parallelism
    sbh(34 + 5as/h); TP sbh(10 + 24/t + 5as/(ht)); TP+SP sbh(34/t + 5as/(ht)); selective
    recomputation drops the 5as/h term (the attention scores); full recomputation keeps 2sbh."""
    if recompute == "full":
        return 2 * s * b * h
    scores = 0.0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return s * b * h * (34 + scores) / t
    return s * b * h * (10 + (24 + scores) / t)


@dataclass(frozen=True)
class Shape:
    """What one micro-step keeps: bytes per token (per sample for non-sequence models), and the
    bf16 copies autocast makes of the weights, kept once per forward."""

    block: dict[AC, float]  # one block, by how it is checkpointed
    stem: float
    head: float
    block_weights: float = 0.0  # a block that is not checkpointed (a checkpointed one recomputes them)
    head_weights: float = 0.0


@dataclass(frozen=True)
class Bytes:
    """Bytes per element as the model runs: e in fp32 and fp64, where activations are the
    parameters' dtype; under bf16 autocast matmuls run and keep bf16 (`compute`), norms keep
    fp32 (`stream`, the residual stream's dtype), and every linear keeps its own bf16 copy of its
    input (in fp32 the linears after one norm share its output) and of its weight."""

    stream: int
    compute: int
    autocast: bool

    def linear_inputs(self, norms: int, linears: int) -> float:
        """What the linears after `norms` norms keep of their inputs, in elements × bytes per h."""
        return linears * self.compute if self.autocast else norms * self.compute

    def weights(self, elements: float) -> float:
        return 2 * elements if self.autocast else 0.0


def _bytes(cfg: Config, stream_in_bf16: int) -> Bytes:
    if cfg.train.precision == "bf16":
        return Bytes(stream=stream_in_bf16, compute=2, autocast=True)
    e = 8 if cfg.train.precision == "fp64" else 4
    return Bytes(stream=e, compute=e, autocast=False)


def _gpt(cfg: Config, data: DataSpec, t: int, sp: bool) -> Shape:
    m, x = cfg.model, _bytes(cfg, FP32)  # the embeddings' sum starts an fp32 residual stream
    h, a = m.get("hidden"), m.get("heads")
    f = m.get("ffn_mult") * h
    r = t if sp else 1  # what sequence parallelism splits along the sequence
    c = x.compute
    return Shape(
        block={
            # Two LayerNorms' inputs (and mean, rstd); the linears' inputs after them (whole:
            # gathered under SP); Q, K, V, attention out (+ logsumexp); GeLU in and out.
            AC.none: x.stream * 2 * h / r
            + x.linear_inputs(2, 4) * h
            + c * (4 * h + 2 * f) / t
            + FP32 * (4 / r + a / t),
            # The block's input; Q, K, V, attention out, w1 out; wo and w2 out (partial sums:
            # whole on every TP rank).
            AC.selective: x.stream * h / r + c * ((4 * h + f) / t + 2 * h) + FP32 * a / t,
            AC.full: x.stream * h / r,
        },
        stem=INT64,  # token ids
        # norm in (+ stats), its output into the head; log-softmax; targets
        head=x.stream * h + x.linear_inputs(1, 1) * h + FP32 * (2 + data.vocab_size) + INT64,
        block_weights=x.weights((4 * h * h + 2 * h * f) / t),
        head_weights=x.weights(h * data.vocab_size),
    )


def _llama(cfg: Config, data: DataSpec, t: int, sp: bool) -> Shape | None:
    m, x = cfg.model, _bytes(cfg, FP32)  # the embedding's output starts an fp32 residual stream
    h, a = m.get("hidden"), m.get("heads")
    kv = m.get("kv_heads") or a
    kvh = kv * (h // a)
    f = m.get("multiple_of") * math.ceil(int(2 * m.get("ffn_mult") * h / 3) / m.get("multiple_of"))
    experts, k = m.get("experts", 0), m.get("top_k", 1)
    if experts and x.autocast:
        return None  # the router's fp32 and the experts' casts: not derived (docs/memory.md)
    r, c = (t if sp else 1), x.compute
    # Each RMSNorm: its input and the normalised input (and rsqrt); the linears' inputs after it
    # (its weighted output); attention: rotated Q, K and V repeated to every head, its output
    # (+ logsumexp).
    common = x.stream * 4 * h / r + x.linear_inputs(2, 5) * h + c * 4 * h / t + FP32 * (2 / r + a / t)
    # input; wq, wk, wv, attention out (+ logsumexp); wo (partial sums: whole on every TP rank)
    kept_attn = x.stream * h / r + c * ((2 * h + 2 * kvh) / t + h) + FP32 * a / t
    if experts:
        # Router probabilities, top-k weights and their sum, each token's k copies gathered,
        # concatenated and weighted; SwiGLU's four per expert token; three int64 routing indices.
        ffn = c * (experts + 2 * k + 1 + 3 * k * h + 4 * k * f) + INT64 * 3 * k
        kept_ffn = c * (experts + k * (2 * f + h))  # router logits; w1, w3, w2 per expert token
    else:
        # w1 out, silu out, w3 out, their product; kept: w1, w3, w2 out
        ffn, kept_ffn = c * 4 * f / t, c * (2 * f / t + h)
    return Shape(
        block={AC.none: common + ffn, AC.selective: kept_attn + kept_ffn, AC.full: x.stream * h / r},
        stem=INT64,
        head=x.stream * 2 * h + x.linear_inputs(1, 1) * h + FP32 * (1 + data.vocab_size) + INT64,
        block_weights=x.weights((2 * h * h + 2 * h * kvh + 3 * h * f) / t),
        head_weights=x.weights(h * data.vocab_size),
    )


def _mlp(cfg: Config, data: DataSpec, t: int, sp: bool) -> Shape:
    m, x = cfg.model, _bytes(cfg, 2)  # the stem's linear starts a bf16 residual stream
    h = m.get("hidden")
    f = m.get("ffn_mult") * h
    n_in = math.prod(data.input_shape)
    c = x.compute
    return Shape(
        block={
            # LayerNorm in (+ stats), its output into fc1, GeLU in and out
            AC.none: x.stream * h + x.linear_inputs(1, 1) * h + c * 2 * f / t + FP32 * 2,
            AC.selective: x.stream * h + c * (f / t + h),  # input, fc1 out, fc2 out
            AC.full: x.stream * h,
        },
        # The flattened input into the first linear (its bf16 copy under autocast); not its weight:
        # the input needs no gradient, so nothing keeps the weight for one.
        stem=c * n_in,
        head=x.stream * h + x.linear_inputs(1, 1) * h + FP32 * (2 + data.num_classes) + INT64,
        block_weights=x.weights(2 * h * f / t),
        head_weights=x.weights(h * data.num_classes),
    )


def _cnn(
    cfg: Config, data: DataSpec, samples: float, blocks: Sequence[int], stem: bool, head: bool
) -> float | None:
    """models/cnn.py, per sample: each conv block keeps its conv's output (GroupNorm's input),
    GroupNorm's mean and rstd per group, and ReLU's output, which the next conv reads as its input
    (so a block's input is kept by the block before it, unless that one is checkpointed); the
    stem's conv also keeps the image. A checkpointed block keeps its input the same way, and under
    selective AC its conv's output."""
    m, x = cfg.model, _bytes(cfg, FP32)
    if x.autocast or m.get("norm", "group") != "group":
        return None  # bf16 convolutions and BatchNorm's statistics: not derived (docs/memory.md)
    e, c0, n = x.compute, m.get("channels"), m.get("layers")
    channels, height, width = data.input_shape
    maps = [(c0, height * width)]  # (channels, pixels) after the stem and after each block
    for i in range(n):
        height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        maps.append((c0 * 2 ** (i + 1), height * width))

    def groups(ch: int) -> int:
        return min(4, ch)  # models/norm.py

    ac = AC(cfg.train.ac)
    chosen = {i for i in blocks if ac != AC.none and (i + 1) % cfg.train.ac_every == 0}
    total = 0.0
    if stem:
        ch, px = maps[0]
        total += e * (channels * data.input_shape[1] * data.input_shape[2] + 2 * ch * px) + FP32 * 2 * groups(
            ch
        )
    for i in blocks:
        (cin, pin), (cout, pout) = maps[i], maps[i + 1]
        # The input: kept by the block before unless that one was checkpointed (or by the stem).
        own_input = 0 if i == 0 or (i - 1) not in chosen else e * cin * pin
        if i not in chosen:
            total += own_input + e * 2 * cout * pout + FP32 * 2 * groups(cout)
        else:
            total += own_input + (e * cout * pout if ac == AC.selective else 0)
    if head:
        total += e * maps[-1][0] + FP32 * data.num_classes + INT64  # pooled features; log-softmax; target
    return samples * total


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
    cp: int = 1,
) -> float | None:
    """Bytes autograd keeps for one micro-step of `samples` samples on a rank that holds the
    blocks at these positions of the model (and its stem and head where it does), under TP
    degree t; None where not predicted. Under context parallelism (cp > 1) a rank keeps its
    seq_len / cp tokens' share: one process's count for them. The ring keeps its own tensors for
    backward (K and V unrepeated, its output and log-sum-exp in fp32, the rank's rotary rows), so
    there the count is an estimate, within 1% on Llama (docs/parallelism.md), not exact."""
    target = cfg.model.target
    if target == "models.cnn.CNN":
        return _cnn(cfg, data, samples, blocks, stem, head)
    shape_of = PER_TOKEN.get(target) or PER_SAMPLE.get(target)
    if shape_of is None:
        return None
    shape = shape_of(cfg, data, t, cfg.strategy.sequence_parallel and t > 1)
    if shape is None:
        return None
    units = samples * (data.seq_len / cp if target in PER_TOKEN else 1)
    ac = AC(cfg.train.ac)
    every = cfg.train.ac_every
    chosen = sum(1 for i in blocks if ac != AC.none and (i + 1) % every == 0)  # as parallel/levers.py picks
    plain = len(blocks) - chosen
    per_unit = chosen * shape.block[ac] + plain * shape.block[AC.none]
    per_unit += (shape.stem if stem else 0.0) + (shape.head if head else 0.0)
    once = plain * shape.block_weights + (shape.head_weights if head else 0.0)
    return units * per_unit + once
