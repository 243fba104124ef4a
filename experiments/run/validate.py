"""Cross-group rules, checked before any process starts. Each failure is one ConfigError line."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from data import dataset_spec
from data.checks import check_data
from experiments.config.ranges import check_ranges
from experiments.config.schema import Config, ConfigError, Objective
from experiments.run.keys import check_used
from experiments.run.launch import check_launcher
from models import check_model_fits_data
from parallel.distenv import check_gpus, uses_cuda
from parallel.mesh import Degrees
from parallel.registry import STRATEGIES, get_spec, resolve_degrees


def _check_eval(cfg: Config) -> None:
    t = cfg.train
    if t.eval_samples == 0 and t.objective == Objective.val_loss:
        raise ConfigError(
            "train.objective=val_loss needs evaluation; set train.eval_samples != 0 or another objective"
        )
    if cfg.model.get("norm") == "sync_batch" and not get_spec(cfg.strategy.name).syncs_batchnorm:
        users = [n for n, sp in STRATEGIES.items() if sp.syncs_batchnorm]
        raise ConfigError(
            f"strategy={cfg.strategy.name} does not synchronise BatchNorm over its ranks (model.norm=sync_batch);"
            f" use model.norm=group, or one of: {', '.join(users)}"
        )


def check_auto_resume(cfg: Config, job_dir: Path) -> None:
    """train.resume=auto in a job dir that holds a checkpoint, under a strategy that cannot load it.

    Apart from validate: only the job dir says whether auto finds a checkpoint.
    """
    from experiments.train.checkpoint import resolve

    if cfg.train.resume != "auto" or get_spec(cfg.strategy.name).resumable:
        return
    source = resolve("auto", job_dir)
    if source is not None:
        raise ConfigError(
            f"strategy={cfg.strategy.name} cannot resume from a checkpoint yet (train.resume=auto: {source}); "
            f"resume it with another strategy: train.resume={job_dir} in a new hydra.run.dir"
        )


def check_resume_source(cfg: Config, job_dir: Path) -> None:
    """The checkpoint the run would resume from loads into this model: checked from its metadata
    before launch, instead of ~70 lines of traceback on every rank. Under resume=auto an
    unreadable checkpoint is set aside (renamed step_<N>.unreadable, nothing deleted) and the
    previous complete one is taken, saying so."""
    from experiments.run.resources import meta_model
    from experiments.train.checkpoint import resolve, unreadable

    source = resolve(cfg.train.resume, job_dir)
    if source is None:
        return
    model = meta_model(cfg)
    while source is not None and (problem := unreadable(source, model)) is not None:
        if cfg.train.resume != "auto":
            raise ConfigError(f"train.resume={cfg.train.resume} cannot be loaded: {problem}")
        aside = source.with_name(f"{source.name}.unreadable")
        with contextlib.suppress(FileNotFoundError):  # another node of the job set it aside first
            source.rename(aside)
        source = resolve("auto", job_dir)
        then = f"resuming from {source.name}" if source is not None else "starting from step 0"
        print(
            f"paralab: checkpoint {aside.name.removesuffix('.unreadable')} cannot be loaded ({problem}); set aside as {aside}; {then}",
            file=sys.stderr,
        )


def validate(cfg: Config, world_size: int | None = None, explicit: Iterable[str] = ()) -> Degrees:
    """Every rule that needs no process; `explicit`: the keys the user set on the command line."""
    t = cfg.train
    check_ranges(cfg)
    _check_eval(cfg)
    if t.resume not in ("auto", "never"):
        from experiments.train.checkpoint import resolve

        try:
            source = resolve(t.resume, Path("."))
        except FileNotFoundError:
            raise ConfigError(
                f"train.resume={t.resume} holds no complete checkpoint; give a job dir or "
                "<job dir>/checkpoints/step_<N>, or auto | never"
            ) from None
        if not get_spec(cfg.strategy.name).resumable:
            raise ConfigError(
                f"strategy={cfg.strategy.name} cannot resume from a checkpoint yet (train.resume={t.resume}: "
                f"{source}); resume it with another strategy, or start over with train.resume=never"
            )
    check_launcher(cfg.launcher)
    if world_size is None:
        world_size = cfg.launcher.nnodes * cfg.launcher.nproc_per_node
    # Where the ranks will run: under SLURM that is the compute node, not the login node.
    problem = check_gpus(t.device, cfg.launcher.nproc_per_node, torch.cuda.device_count())
    if problem:
        raise ConfigError(problem)

    spec = get_spec(cfg.strategy.name)
    check_used(cfg, explicit)
    preset = spec.fixed_reshard
    if preset is not None and cfg.strategy.reshard_after_forward != preset:
        raise ConfigError(
            f"strategy={cfg.strategy.name} means reshard_after_forward={str(preset).lower()}; "
            "use strategy=fsdp to choose it freely"
        )
    if spec.check is not None:
        spec.check(cfg)
    degrees = resolve_degrees(cfg.strategy, world_size)
    check_data(cfg)
    data = dataset_spec(cfg.dataset)
    model = check_model_fits_data(cfg.model, data, cfg.dataset.name)

    per_step = t.grad_accum_steps * degrees.dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by grad_accum_steps × data-parallel "
            f"size = {t.grad_accum_steps} × {degrees.dp}; use a multiple of {per_step}"
        )
    if cfg.dataset.num_samples < t.global_batch_size and cfg.dataset.name in (
        "synthetic",
        "tokens",
        "fake_images",
    ):
        raise ConfigError(
            f"dataset.num_samples={cfg.dataset.num_samples} is smaller than train.global_batch_size={t.global_batch_size}"
        )
    from parallel.levers import check_levers
    from parallel.plans import check_plans

    check_plans(cfg, degrees, spec, model)
    check_levers(cfg, model, spec.no_compile, spec.pipelined)
    _check_offload(cfg)
    _check_profile(cfg)
    if t.predict:
        from experiments.plan.cluster import machine

        machine(cfg.cluster)  # the cluster and its calibration file, read at the end of the run
    return degrees


def _check_offload(cfg: Config) -> None:
    """FSDP2's CPUOffloadPolicy and DeepSpeed's offload move model state from GPU to host memory."""
    if cfg.strategy.offload and not uses_cuda(cfg.train.device):
        raise ConfigError(
            "strategy.offload=true moves parameters, gradients and optimizer state from GPU to host "
            "memory; on CPU they are there already (FSDP2's CPUOffloadPolicy needs CUDA): drop it"
        )


def _check_profile(cfg: Config) -> None:
    t = cfg.train
    last = t.profile_from + t.profile_steps - 1
    if t.profile and last > t.steps:
        raise ConfigError(
            f"train.profile traces steps {t.profile_from}..{last}, past train.steps={t.steps}; lower "
            "train.profile_from or train.profile_steps"
        )
    if t.memory_snapshot and not uses_cuda(t.device):
        raise ConfigError(
            "train.memory_snapshot=true records CUDA allocations (torch.cuda.memory); on CPU there are "
            "none to record: drop it, or run on GPUs"
        )
