"""DeepSpeed's ZeRO (stage 1, 2 or 3) beside torch's own: the optional extra `.[deepspeed]`.

DeepSpeed's engine owns what torch's strategies leave to the loop: it reduces the gradients into
its own partitioned buffers, keeps an fp32 master partition, steps the optimizer on it and (stage
3) gathers parameters in its forward and backward hooks. So this strategy hands the loop an
`Engine` (parallel/base.py): the loop calls its step in place of optimizer.step(), and the
engine's memory, parameters and optimizer state are read through it.

It runs on the process group paralab already initialised (DeepSpeed wraps torch.distributed and
adopts an initialised default group), with paralab's data, seed and optimizer. The accelerator is
chosen from paralab's device (DS_ACCELERATOR), never by DeepSpeed's own probing: a CPU run on a
GPU machine stays on CPU/gloo.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from experiments.config.schema import Config, ConfigError
from parallel.base import Engine, Parallelized, StrategyContext
from parallel.optim import OptimizerSpec

STAGES = (1, 2, 3)
INSTALL = "pip install -e '.[deepspeed]'"


def installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def check(cfg: Config) -> None:
    """What DeepSpeed cannot run as paralab configures it, before any process starts."""
    s = cfg.strategy
    if s.zero_stage not in STAGES:
        raise ConfigError(f"strategy.zero_stage={s.zero_stage} is not one of: 1, 2, 3")
    if cfg.train.precision == "fp64":
        raise ConfigError("strategy=deepspeed trains in fp32 or bf16, not train.precision=fp64")
    if not installed():
        raise ConfigError(f"strategy=deepspeed needs the optional extra: {INSTALL}")


def ds_config(cfg: Config, dp: int) -> dict[str, Any]:
    t = cfg.train
    bucket = int(cfg.strategy.bucket_cap_mb * 2**20 / 4)  # elements of fp32
    return {
        "train_micro_batch_size_per_gpu": t.global_batch_size // t.grad_accum_steps // dp,
        "gradient_accumulation_steps": t.grad_accum_steps,
        # paralab's loop owns the accumulation boundary: backward() per micro-step, step() once.
        # Stage 1 then reduces in step() only; stages 2 and 3 reduce in every backward
        # (their gradients exist only as partitions).
        "managed_gradient_accumulation": False,
        "zero_optimization": {
            "stage": cfg.strategy.zero_stage,
            # By default ZeRO-3 keeps parameters under 1e5 elements whole on every rank: on
            # paralab's small models, all of them. Partition every one, as the paper does.
            "stage3_param_persistence_threshold": 0,
            # DeepSpeed's buckets default to 5e8 elements (2 GB in fp32), allocated with
            # torch.empty, which train.deterministic fills with NaN on every allocation: 0.6 s a
            # step on CPU here. Size them as DDP's (strategy.bucket_cap_mb).
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
            # strategy.offload: the optimizer's states and step in host memory (ZeRO-Offload),
            # with torch's optimizer where DeepSpeed would insist on its own CPU Adam.
            **({"offload_optimizer": {"device": "cpu", "pin_memory": True}} if cfg.strategy.offload else {}),
        },
        "zero_force_ds_cpu_optimizer": False,
        # DeepSpeed clips to 1.0 unless told otherwise; paralab clips only when asked (the same
        # rule: scale by min(1, max_norm / (norm + 1e-6)), inside DeepSpeed's step).
        "gradient_clipping": t.grad_clip,
        # torch's SGD is not on DeepSpeed's list of tested ZeRO optimizers; AdamW is.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    """paralab's view of one deepspeed.DeepSpeedEngine."""

    # DeepSpeed links its parameters to their optimizer-state fragments when it builds its
    # optimizer, before any state exists; state created later for a load is not linked, so
    # safe_set_full_optimizer_state cannot fill it. Its checkpoints load into every other strategy.
    resumable = False

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.zero = engine.optimizer  # DeepSpeedZeroOptimizer or DeepSpeedZeroOptimizer_Stage3

    def forward_backward(self, ctx: StrategyContext, x: Tensor, y: Tensor, scale: float) -> Tensor:
        with ctx.autocast():
            loss = ctx.loss_fn(self.engine(x), y)
        self.engine.backward(loss * scale, scale_wrt_gas=False)
        return loss.detach()

    def step(self) -> Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(norm if norm is not None else float("nan"), dtype=torch.float32)
        return norm.to(self.engine.device) ** 2

    @contextmanager
    def whole_parameters(self, modify: bool = False) -> Iterator[None]:
        import deepspeed

        params = list(self.engine.module.parameters())
        # ZeRO-3 only: gather the partitions; with modify, rank 0's values (every rank loads the
        # same) are partitioned again on the way out.
        with deepspeed.zero.GatheredParameters(
            params, modifier_rank=0 if modify else None, enabled=hasattr(params[0], "ds_id")
        ):
            yield

    def memory(self) -> dict[str, int]:
        """Bytes of distinct storages DeepSpeed holds now, by category.

        params: the module's parameters (ZeRO-3: their partitions, `ds_tensor`); grads: the
        parameters' .grad and the ZeRO optimizer's gradient buffers and buckets (attributes named
        for grads or for the "ipg" bucket); optim: the torch optimizer's state plus DeepSpeed's fp32
        master partitions (in the ZeRO paper's accounting the master copy is optimizer state).
        A storage is counted once, in the first category that finds it.
        """
        seen: set[int] = set()
        params = list(self.engine.module.parameters())
        zero = vars(self.zero)
        return {
            "params": _bytes([*params, *(getattr(p, "ds_tensor", None) for p in params)], seen),
            "grads": _bytes(
                [p.grad for p in params] + [v for k, v in zero.items() if "grad" in k or "ipg" in k], seen
            ),
            "optim": _bytes(
                [s for st in self.engine.basic_optimizer.state.values() for s in st.values()]
                + [v for k, v in zero.items() if "fp32" in k],
                seen,
            ),
        }

    def optimizer_state(self, model: nn.Module) -> dict[str, dict[str, Tensor]]:
        """The optimizer state by parameter name, whole, as torch's optimizer would hold it.

        DeepSpeed keeps it per flat fp32 partition; its safe_get_full_optimizer_state gathers one
        parameter's slice of it (one all-reduce each). Per-step counters are one scalar for the
        whole partition, the same for every parameter.
        """
        from deepspeed.utils import safe_get_full_optimizer_state

        flat = [s for s in self.engine.basic_optimizer.state.values() if s]
        if not flat:
            return {}
        keys = {k: v for k, v in flat[0].items() if isinstance(v, Tensor)}
        out: dict[str, dict[str, Tensor]] = {}
        for name, p in model.named_parameters():
            out[name] = {
                k: v.detach().clone() if v.numel() == 1 else safe_get_full_optimizer_state(p, k)
                for k, v in keys.items()
            }
        return out


def _tensors(obj: object, depth: int = 4) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif depth and isinstance(obj, list | tuple):
        for o in obj:
            yield from _tensors(o, depth - 1)
    elif depth and isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o, depth - 1)


def _bytes(objs: list[object], seen: set[int]) -> int:
    from parallel.layout import storage_bytes

    return storage_bytes(_tensors(objs), seen)


def apply_deepspeed(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    # Before DeepSpeed is first imported: it picks its accelerator once, at import.
    os.environ["DS_ACCELERATOR"] = ctx.device.type
    import deepspeed

    dp = mesh["dp_replicate"].size()

    def make_optimizer(module: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
        # DeepSpeed wraps paralab's own optimizer; its param_groups then hold DeepSpeed's fp32
        # partitions, so the LR schedule on it drives DeepSpeed's steps.
        basic = spec(module.parameters())
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=basic, config=ds_config(ctx.cfg, dp), dist_init_required=False
        )
        par.engine = DeepSpeedEngine(engine)
        return basic

    def forward_backward(x: Tensor, y: Tensor, scale: float, sync: bool) -> Tensor:
        assert isinstance(par.engine, DeepSpeedEngine), "make_optimizer builds the engine"
        return par.engine.forward_backward(ctx, x, y, scale)

    par = Parallelized(
        model=model,
        forward_backward=forward_backward,
        make_optimizer=make_optimizer,
        notes=[f"deepspeed {deepspeed.__version__}: ZeRO stage {ctx.cfg.strategy.zero_stage} on {dp} ranks"],
    )
    return par
