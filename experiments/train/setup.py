"""Everything a run needs before its first step: mesh, model, strategy, optimizer, data, Meter."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from data import build_dataset, dataset_spec, make_loader
from data.spec import DataSpec, loss_fn_for
from experiments.config.schema import Config
from experiments.measure.flops import peak_flops_per_s, training_flops_per_sample
from experiments.measure.metrics import TensorBoardSink
from experiments.measure.predict import predict
from experiments.measure.profiling import StepProfiler
from experiments.train import checkpoint
from experiments.train.evaluate import Evaluator
from experiments.train.meter import Meter, Rates, TimedBatches
from experiments.train.state import TrainState
from experiments.train.step import GradNorm, replay_first_backward
from models import build_model, meta_model
from models.staged import aux_loss_of, blocks_of
from parallel.base import Parallelized, StrategyContext
from parallel.costs import ModelSizes, Setting
from parallel.distenv import RankEnv
from parallel.layout import local_optimizer
from parallel.mesh import Degrees, build_mesh, dp_rank_and_size
from parallel.optim import lr_scheduler, optimizer_spec
from parallel.parallelize import parallelize
from parallel.registry import StrategySpec, get_spec, resolve_degrees


def pinned(batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches in page-locked memory, so the step's non_blocking copies overlap compute."""
    for x, y in batches:
        yield x.pin_memory(), y.pin_memory()


def with_aux_loss(loss_fn, model: nn.Module, terms: list[Tensor]):
    """The loss plus the auxiliary loss `model`'s last forward computed (a router's load balancing),
    whose value each micro-step leaves in `terms` for the Meter to log."""

    def loss(out: Tensor, y: Tensor) -> Tensor:
        aux = aux_loss_of(model)
        terms.append(aux.detach())
        return loss_fn(out, y) + aux

    return loss


@dataclass
class Run:
    cfg: Config
    env: RankEnv
    device: torch.device
    degrees: Degrees
    mesh: DeviceMesh
    par: Parallelized
    state: TrainState
    batches: TimedBatches
    norm: GradNorm
    meter: Meter
    evaluator: Evaluator | None  # None: train.eval_samples=0
    sink: TensorBoardSink
    spec: StrategySpec
    psi: int
    tokens_per_sample: int
    data: DataSpec  # the dataset's shapes, as the model was built for them

    def close(self) -> None:
        """What was logged stays readable, and an engine's agents (RPC's) do not outlive the run."""
        self.sink.close()
        if self.par.engine is not None:
            self.par.engine.close()


def setup(cfg: Config, env: RankEnv, device: torch.device, job_dir: Path, log: logging.Logger) -> Run:
    t = cfg.train
    degrees = resolve_degrees(cfg.strategy, env.world_size)
    mesh = build_mesh(degrees, device.type)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    dataset = build_dataset(cfg.dataset, cfg.seed)
    spec = dataset_spec(cfg.dataset, dataset)

    # Every rank builds the full model from one seed before sharding: identical initial weights
    # for every strategy and world size.
    ctx = StrategyContext(cfg, device, loss_fn_for(spec))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, spec).to(device=device, dtype=ctx.param_dtype)
    psi, elem = sum(p.numel() for p in model.parameters()), next(model.parameters()).element_size()
    flops_per_sample, has_conv = training_flops_per_sample(
        lambda: meta_model(cfg.model, spec), spec, ctx.loss_fn
    )
    aux_terms: list[Tensor] | None = None
    if aux_loss_of(model) is not None:
        aux_terms = []
        ctx.loss_fn = with_aux_loss(ctx.loss_fn, model, aux_terms)
    block_order = list(blocks_of(model) or {})
    strategy = get_spec(cfg.strategy.name)
    par = parallelize(model, mesh, degrees, ctx, strategy, spec.seq_len)
    del model  # pipeline ranks keep only their stages
    for note in par.notes:
        log.info(note)
    opt = par.make_optimizer(par.model, optimizer_spec(t))
    state = TrainState(par.model, opt, lr_scheduler(opt, t), engine=par.engine)
    source = checkpoint.resolve(t.resume, job_dir)
    progress = checkpoint.load(state, source) if source is not None else None
    if progress is not None:
        log.info("resumed from %s at step %d", source, state.step)

    micro_global = t.global_batch_size // t.grad_accum_steps
    loader = iter(
        make_loader(dataset, cfg.dataset, micro_global, dp_rank, dp_size, cfg.seed, state.data_position)
    )
    if t.precision == "fp64":
        loader = ((ctx.inputs(x), y) for x, y in loader)
    if progress is not None and par.replay_on_resume:
        first = next(loader)
        replay_first_backward(par, first, device)
        loader = itertools.chain([first], loader)
    batches = TimedBatches(pinned(loader) if device.type == "cuda" else loader)
    local_samples = t.global_batch_size // dp_size
    tokens_per_sample = spec.seq_len if spec.task == "lm" else 0
    owned_psi = sum(p.numel() for g in local_optimizer(opt).param_groups for p in g["params"])
    sizes = ModelSizes.of(par.model, psi, elem, assigned_psi=owned_psi, block_order=block_order)
    pp_rank = mesh["pp"].get_local_rank()
    theory = predict(strategy, Setting(cfg, degrees, sizes, local_samples, spec.seq_len, pp_rank, spec))
    peak, peak_dtype = peak_flops_per_s(device, cfg, has_conv)
    if device.type == "cuda":
        log.info(
            "MFU against %s: %.0f TFLOP/s per GPU (%s); FLOPs per sample counted: %.4g",
            f"{peak_dtype} peak" if peak else "no known peak (set train.peak_tflops)",
            peak / 1e12,
            torch.cuda.get_device_name(device),
            flops_per_sample,
        )
    rates = Rates(
        global_batch=t.global_batch_size,
        local_batch=local_samples,
        tokens_per_sample=tokens_per_sample,
        flops_per_step=flops_per_sample * t.global_batch_size,
        peak_flops=peak,
        devices=env.world_size * par.devices_per_rank,
        devices_per_rank=par.devices_per_rank,
    )
    # A resumed run writes on into the same TensorBoard runs; purge_step hides whatever the
    # interrupted run wrote past its checkpoint, so no step appears twice.
    sink = TensorBoardSink(job_dir, env.rank, t.steps, purge_step=state.step + 1 if state.step else None)
    meter = Meter(
        t,
        env,
        device,
        state,
        batches,
        sink,
        theory,
        rates,
        # Context-parallel ranks hold the mean over their share of the tokens, equal in number.
        loss_holders=degrees.dp * degrees.cp * degrees.tp,
        busy_seconds=par.busy_seconds,
        log=log,
        progress=progress,
        aux_terms=aux_terms,
        pipelined=strategy.pipelined,
        profiler=StepProfiler(
            t, job_dir, env.rank, device, degrees.axis("pp") if strategy.pipelined else None
        )
        if t.profile
        else None,
    )
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
    if not meter.timing_meaningful:
        log.warning("timings not meaningful: %s", meter.timing_note)
    norm = GradNorm(par.model, mesh, device)
    evaluator = None
    if t.eval_samples != 0:
        held_out = build_dataset(cfg.dataset, cfg.seed, "val")
        evaluator = Evaluator(held_out, spec, par, ctx, dp_rank, dp_size, mesh["tp"].get_local_rank())
    return Run(
        cfg,
        env,
        device,
        degrees,
        mesh,
        par,
        state,
        batches,
        norm,
        meter,
        evaluator,
        sink,
        strategy,
        psi,
        tokens_per_sample,
        spec,
    )
