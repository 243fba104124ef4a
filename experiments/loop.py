"""The training loop. It sees a Parallelized record, never the strategy's name."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor

from data import build_dataset, dataset_spec, make_loader
from data.spec import DataSpec
from experiments.config import Config
from experiments.distenv import RankEnv
from experiments.measure import (
    CommCounter,
    GatheredParams,
    counting,
    local_optimizer,
    optimizer_state_bytes,
    peak_flops_per_s,
    peak_memory_bytes,
    storage_bytes,
)
from experiments.metrics import Recorder, write_hparams, write_metrics
from experiments.optim import lr_scheduler, optimizer_spec
from experiments.predict import ModelSizes, predict
from experiments.theory import training_flops_per_token
from models import build_model
from parallel.base import Parallelized, StrategyContext
from parallel.mesh import Degrees, build_mesh, dp_rank_and_size, resolve_degrees
from parallel.registry import get_spec


def loss_fn_for(spec: DataSpec):
    if spec.task == "lm":
        return lambda logits, y: F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    return lambda logits, y: F.cross_entropy(logits.float(), y)


def grad_norm(par: Parallelized) -> float:
    """Global L2 norm of the gradient, whatever the sharding: DTensor norms reduce over their mesh."""
    sq = torch.zeros((), dtype=torch.float32)
    for p in par.model.parameters():
        if p.grad is None:
            continue
        n = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq = sq.to(n.device) + n * n
    if par.pp_group is not None:
        dist.all_reduce(sq, group=par.pp_group)
    return math.sqrt(sq.item())


def global_mean_loss(
    losses: list[Tensor], par: Parallelized, degrees: Degrees, device: torch.device
) -> float:
    """Mean loss over the global batch. Every last-stage rank holds its dp shard's mean; TP peers agree."""
    holders = degrees.dp * degrees.tp
    local = torch.stack(losses).float().mean() / holders if losses else torch.zeros(())
    local = local.to(device)
    dist.all_reduce(local)
    return local.item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(cfg: Config, env: RankEnv, device: torch.device, job_dir: Path, log: logging.Logger) -> float:
    t = cfg.train
    degrees = resolve_degrees(cfg.strategy, env.world_size)
    mesh = build_mesh(degrees, device.type)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    spec = dataset_spec(cfg.dataset)
    dataset = build_dataset(cfg.dataset, cfg.seed)

    # Every rank builds the full model from one seed before sharding: identical initial weights
    # for every strategy and world size.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, spec).to(device)
    psi, elem = sum(p.numel() for p in model.parameters()), next(model.parameters()).element_size()
    ctx = StrategyContext(cfg, device, loss_fn_for(spec))
    par: Parallelized = get_spec(cfg.strategy.name).load()(model, mesh, ctx)
    del model  # pipeline ranks keep only their stages
    for note in par.notes:
        log.info(note)
    opt = par.make_optimizer(par.model, optimizer_spec(t))
    sched = lr_scheduler(opt, t)

    micro_global = t.global_batch_size // t.grad_accum_steps
    batches = iter(make_loader(dataset, cfg.dataset, micro_global, dp_rank, dp_size, cfg.seed))
    local_samples = t.global_batch_size // dp_size
    tokens_per_sample = spec.seq_len if spec.task == "lm" else 0
    owned_psi = sum(p.numel() for g in local_optimizer(opt).param_groups for p in g["params"])
    sizes = ModelSizes(psi, elem, assigned_psi=owned_psi)
    theory = predict(cfg, degrees, sizes, local_samples, spec.seq_len)
    gathered = GatheredParams(par.model)
    peak_flops = peak_flops_per_s(device, t)
    flops_per_step = training_flops_per_token(psi) * t.global_batch_size * max(1, tokens_per_sample)

    log.info(
        "strategy=%s degrees=%s world=%d dp_rank=%d/%d device=%s threads=%d params=%d",
        cfg.strategy.name,
        degrees.as_dict(),
        env.world_size,
        dp_rank,
        dp_size,
        device,
        torch.get_num_threads(),
        psi,
    )
    rec = Recorder(job_dir, env.rank, t.steps, t.log_every)
    last_measure: dict[str, float] = {}
    wall0 = time.perf_counter()
    for step in range(1, t.steps + 1):
        # Sampled steps run under the comm counter and memory probes; the others are timed clean.
        measured = t.measure_every > 0 and (step == min(2, t.steps) or step % t.measure_every == 0)
        counter = CommCounter() if measured else None
        gathered.arm(measured)
        t0 = time.perf_counter()
        data_time = fb_time = 0.0
        losses: list[Tensor] = []
        for micro in range(t.grad_accum_steps):
            td = time.perf_counter()
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            tf = time.perf_counter()
            data_time += tf - td
            with counting(counter):
                loss = par.forward_backward(x, y, 1.0 / t.grad_accum_steps, micro == t.grad_accum_steps - 1)
            fb_time += time.perf_counter() - tf
            if loss is not None:
                losses.append(loss)
        grads_bytes = storage_bytes(p.grad for p in par.model.parameters()) if measured else 0
        gnorm = grad_norm(par)
        lr = sched.get_last_lr()[0]
        with counting(counter):
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        step_time = time.perf_counter() - t0
        loss_value = global_mean_loss(losses, par, degrees, device)
        scalars = {
            "lr": lr,
            "grad_norm": gnorm,
            "perf/step_time_s": step_time,
            "perf/data_time_s": data_time,
            "perf/samples_per_s": t.global_batch_size / step_time,
            "perf/rank_samples_per_s": local_samples / step_time,
        }
        if tokens_per_sample:
            scalars["perf/tokens_per_s"] = t.global_batch_size * tokens_per_sample / step_time
            scalars["perf/rank_tokens_per_s"] = local_samples * tokens_per_sample / step_time
        if peak_flops:
            scalars["perf/mfu"] = flops_per_step / step_time / env.world_size / peak_flops
        if par.busy_seconds is not None:
            busy = par.busy_seconds()
            scalars["pipeline/busy_s"] = busy
            scalars["pipeline/bubble_fraction"] = max(0.0, 1.0 - busy / fb_time)
        if measured:
            assert counter is not None
            params_bytes = storage_bytes(par.model.parameters())
            optim_bytes = optimizer_state_bytes(opt)
            peak_key, peak_value = peak_memory_bytes(device)
            last_measure = {
                **counter.scalars(),
                "mem/params_bytes": params_bytes,
                "mem/params_gathered_bytes": gathered.bytes,
                "mem/grads_bytes": grads_bytes,
                "mem/optim_bytes": optim_bytes,
                "mem/model_state_bytes": params_bytes + gathered.bytes + grads_bytes + optim_bytes,
                peak_key: peak_value,
            }
            scalars.update(last_measure)
            scalars.update(theory)
        rec.step(step, loss_value, scalars, log, measured)
    wall = time.perf_counter() - wall0
    rec.close()

    if t.save_checkpoint:
        from experiments.checkpoint import save_model

        save_model(par.model, job_dir)
    # Per rank, with this rank's own prediction (ZeRO-1's optimizer shard differs between ranks).
    mine = {
        "rank": env.rank,
        **last_measure,
        **theory,
        **{k: v for k, v in rec.means().items() if k.startswith("pipeline/")},
    }
    ranks: list[dict] | None = [None] * env.world_size if env.rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(mine, ranks, dst=0)
    if env.rank == 0:
        assert ranks is not None
        pipelined = get_spec(cfg.strategy.name).needs_stages
        step_time = rec.steady_step_time()
        metrics = {
            "strategy": cfg.strategy.name,
            "world_size": env.world_size,
            "degrees": degrees.as_dict(),
            "model": cfg.model.name,
            "dataset": cfg.dataset.name,
            "launcher": cfg.launcher.name,
            "optimizer": t.optimizer,
            "global_batch_size": t.global_batch_size,
            "grad_accum_steps": t.grad_accum_steps,
            "precision": t.precision,
            "schedule": cfg.strategy.schedule if pipelined else None,
            "microbatches": cfg.strategy.microbatches if pipelined else None,
            "steps": t.steps,
            "params": psi,
            "losses": rec.losses,
            "final_loss": rec.losses[-1],
            "step_time_s": step_time,
            "samples_per_s": t.global_batch_size / step_time,
            "tokens_per_s": t.global_batch_size * tokens_per_sample / step_time
            if tokens_per_sample
            else None,
            "wall_s": wall,
            "theory": theory,
            "ranks": ranks,
            "notes": par.notes,
        }
        write_metrics(job_dir, metrics)
        write_hparams(job_dir, metrics)
    return rec.losses[-1]
