"""Analytic predictions from the ZeRO, GPipe and Megatron papers (see papers.md in shared docs).

Ψ (psi) = parameter count, N = data-parallel degree, K = optimizer-state bytes per parameter.
Everything here is a pure function so it can be checked against the papers' printed tables.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- ZeRO §3.1 / Table 1: model-state bytes per device --------------------------------------

ZERO_STAGES = ("dp", "os", "os+g", "os+g+p")


@dataclass(frozen=True)
class Precision:
    param_bytes: int  # bytes per parameter of the working copy
    grad_bytes: int
    k: int  # optimizer-state bytes per parameter


MIXED_ADAM = Precision(param_bytes=2, grad_bytes=2, k=12)  # fp16 params/grads, fp32 master + m + v
FP32_ADAM = Precision(param_bytes=4, grad_bytes=4, k=8)  # fp32 params/grads, m + v


def zero_model_state_bytes(stage: str, psi: float, n: int, p: Precision = MIXED_ADAM) -> float:
    """Bytes of params + grads + optimizer state per device (ZeRO paper, Figure 1 / Table 1)."""
    params, grads, opt = p.param_bytes * psi, p.grad_bytes * psi, p.k * psi
    if stage == "dp":
        return params + grads + opt
    if stage == "os":
        return params + grads + opt / n
    if stage == "os+g":
        return params + (grads + opt) / n
    if stage == "os+g+p":
        return (params + grads + opt) / n
    raise ValueError(f"unknown ZeRO stage {stage!r}; one of {ZERO_STAGES}")


# ---- Ring collectives (nccl-tests performance notes): bytes each rank sends ----------------
# A model, not a measurement: NCCL picks rings, trees or NVLS (in-switch reduction on NVSwitch)
# by size and topology, so what really crosses the wires can be less than this.


def ring_bytes(collective: str, size: float, n: int) -> float:
    """Bytes one rank sends for a collective over a full tensor of `size` bytes among n ranks."""
    if n <= 1:
        return 0.0  # a group of one talks to nobody
    if collective == "all_reduce":
        return 2 * (n - 1) / n * size
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n * size  # all-to-all: an even split, of which 1/n stays here
    if collective in ("broadcast", "send"):
        return size
    if collective == "recv":
        return 0.0  # received, not sent: the peer's send already counts these bytes
    raise ValueError(f"unknown collective {collective!r}")


# ---- ZeRO §7: communication volume per device per step, in elements ------------------------


def zero_comm_elements(stage: str, psi: float) -> float:
    """DP and ZeRO-1/2: 2Ψ (reduce-scatter + all-gather); ZeRO-3: 3Ψ, i.e. 1.5× DP."""
    if stage in ("dp", "os", "os+g"):
        return 2 * psi
    if stage == "os+g+p":
        return 3 * psi
    raise ValueError(f"unknown ZeRO stage {stage!r}")


# ---- Pipeline bubbles: GPipe §2.3 and Narayanan et al. 2021 §2.2 ---------------------------


def bubble_share_of_total(p: int, m: int, v: int = 1) -> float:
    """Idle share of the whole step: (p−1)/(v·m + p−1); GPipe's (K−1)/(M+K−1) for v = 1."""
    return (p - 1) / (v * m + p - 1)


def bubble_relative_to_ideal(p: int, m: int, v: int = 1) -> float:
    """Bubble time over ideal compute time: (p−1)/m for GPipe and 1F1B, (p−1)/(v·m) interleaved."""
    return (p - 1) / (v * m)


# ---- Megatron-LM §3 / Narayanan §3.2: tensor-parallel activations moved --------------------


def tp_elements_per_layer(b: int, s: int, h: int, t: int) -> float:
    """Elements one device moves per transformer layer per microbatch: 8·b·s·h·(t−1)/t."""
    return 8 * b * s * h * (t - 1) / t


# ---- Ultra-Scale Playbook: transformer parameters and FLOPs --------------------------------


def transformer_params(h: int, v: int, layers: int) -> int:
    """N = h·v + L·(12h² + 13h) + 2h (tied embeddings, biased linears, learned norms)."""
    return h * v + layers * (12 * h * h + 13 * h) + 2 * h
