"""The papers' formulas applied to one run, in the same categories the measurements use.

Two memory predictions are logged: `theory/paper_*` is the ZeRO paper's formula with this run's
sizes; `theory/*` is what torch's implementation of the strategy must hold, which differs from the
paper in two known, stated ways: FSDP2 in ZeRO-2 mode keeps each parameter's shard beside the
gathered copy (in the paper's mixed-precision accounting that shard is the fp32 master copy inside
K; its fp32 formula has no master copy), and ZeroRedundancyOptimizer assigns whole parameters to
ranks rather than an even split. Elsewhere the two agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from experiments.config import Config
from experiments.theory import (
    Precision,
    bubble_relative_to_ideal,
    bubble_share_of_total,
    ring_bytes,
    zero_model_state_bytes,
)
from parallel.mesh import Degrees

ZERO_STAGE_OF = {"ddp": "dp", "single": "dp", "dp": "dp", "zero1": "os", "zero2": "os+g", "zero3": "os+g+p"}


@dataclass(frozen=True)
class ModelSizes:
    psi: int  # parameters of the whole model
    param_bytes: int  # bytes per parameter element (4 for fp32 weights)
    assigned_psi: int | None = None  # ZeRO-1: parameters whose optimizer state this rank owns


def optimizer_state_bytes_per_param(cfg: Config) -> int:
    if cfg.train.optimizer == "adamw":
        return 8  # exp_avg + exp_avg_sq in fp32
    return 4 if cfg.train.momentum else 0


def _zero_stage(cfg: Config) -> str | None:
    name = cfg.strategy.name
    if name == "fsdp":
        return "os+g+p" if cfg.strategy.reshard_after_forward else "os+g"
    return ZERO_STAGE_OF.get(name)


def memory(cfg: Config, d: Degrees, m: ModelSizes) -> dict[str, float]:
    stage = _zero_stage(cfg)
    if stage is None or d.tp * d.pp > 1:
        return {}
    n, b = d.dp, m.param_bytes
    k = optimizer_state_bytes_per_param(cfg)
    psi = m.psi
    if stage == "dp":
        cats = {"params": b * psi, "params_gathered": 0.0, "grads": b * psi, "optim": k * psi}
    elif stage == "os":
        owned = psi if m.assigned_psi is None else m.assigned_psi
        cats = {"params": b * psi, "params_gathered": 0.0, "grads": b * psi, "optim": k * owned}
    else:
        # ZeRO-2 holds every gathered parameter from forward into backward; ZeRO-3 none.
        gathered = psi if stage == "os+g" else 0
        cats = {
            "params": b * psi / n,
            "params_gathered": b * gathered,
            "grads": b * psi / n,
            "optim": k * psi / n,
        }
    out = {f"theory/mem/{c}_bytes": v for c, v in cats.items()}
    out["theory/mem/model_state_bytes"] = sum(cats.values())
    out["theory/mem/paper_model_state_bytes"] = zero_model_state_bytes(stage, psi, n, Precision(b, b, k))
    return out


def communication(cfg: Config, d: Degrees, m: ModelSizes, local_batch: int, seq_len: int) -> dict[str, float]:
    """Payload bytes S per collective per step, and the ring bytes this rank sends for them."""
    name, a, b = cfg.strategy.name, cfg.train.grad_accum_steps, m.param_bytes
    payload: dict[str, tuple[float, int]] = {}
    stage = _zero_stage(cfg)
    if d.tp * d.pp == 1 and stage in ("dp", "os") and name != "dp" and name != "single":
        payload["all_reduce"] = (
            b * m.psi,
            d.dp,
        )  # every gradient once per step (no_sync on inner micro-steps)
        if stage == "os":
            payload["broadcast"] = (b * m.psi, d.dp)  # each updated parameter, from its owner
    elif d.tp * d.pp == 1 and stage in ("os+g", "os+g+p"):
        # Forward gathers every parameter; ZeRO-3 gathers them all again for backward (ZeRO §7).
        gathers = 2 if stage == "os+g+p" else 1
        payload["all_gather"] = (b * a * gathers * m.psi, d.dp)
        payload["reduce_scatter"] = (b * m.psi, d.dp)
    elif name == "tp":
        h = cfg.model.hidden
        # Megatron: one all-reduce per column→row pair forward and one backward; a transformer
        # layer has two pairs (attention, MLP), the MLP block one.
        pairs = 2 if cfg.model.name == "transformer" else 1
        tokens = local_batch * (seq_len if cfg.model.name == "transformer" else 1) // a
        payload["all_reduce"] = (4 * a * 2 * pairs * cfg.model.layers * tokens * h, d.tp)
    out: dict[str, float] = {}
    for coll, (size, n) in payload.items():
        out[f"theory/comm/{coll}_bytes"] = size
        out[f"theory/comm/{coll}_wire_bytes"] = ring_bytes(coll, size, n)
    return out


def bubble(cfg: Config, d: Degrees) -> dict[str, float]:
    s = cfg.strategy
    if s.name not in ("pp", "mp", "ddp_pp", "fsdp_tp_pp") or s.schedule not in (
        "gpipe",
        "1f1b",
        "interleaved1f1b",
    ):
        return {}
    from parallel.pipeline import stages_per_rank

    v = stages_per_rank(s.schedule, s.stages_per_rank)
    m = s.microbatches * cfg.train.grad_accum_steps
    return {
        "theory/pipeline/bubble_fraction": bubble_share_of_total(d.pp, m, v),
        "theory/pipeline/bubble_relative_to_ideal": bubble_relative_to_ideal(d.pp, m, v),
    }


def predict(cfg: Config, d: Degrees, m: ModelSizes, local_batch: int, seq_len: int) -> dict[str, float]:
    return {**memory(cfg, d, m), **communication(cfg, d, m, local_batch, seq_len), **bubble(cfg, d)}
