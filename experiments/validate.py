"""Cross-group rules, checked before any process starts. Each failure is one ConfigError line."""

from __future__ import annotations

from pathlib import Path

import torch

from data import check_dataset, dataset_spec
from experiments.config import Config, ConfigError
from experiments.optim import LR_SCHEDULES, OPTIMIZERS
from models import check_model_fits_data
from parallel.launch import check_launcher
from parallel.mesh import Degrees, resolve_degrees
from parallel.registry import get_spec

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value} is not one of: {', '.join(allowed)}")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key}={value} must be >= 1")


def validate(cfg: Config, world_size: int | None = None) -> Degrees:
    t = cfg.train
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.device", t.device, DEVICES)
    for key in ("steps", "global_batch_size", "grad_accum_steps", "log_every"):
        _positive(f"train.{key}", getattr(t, key))
    if not t.lr > 0:  # also rejects nan
        raise ConfigError(f"train.lr={t.lr} must be > 0")
    if not t.grad_clip >= 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be >= 0 (0 = no clipping)")
    for key, value in [
        ("train.measure_every", t.measure_every),
        ("train.warmup_steps", t.warmup_steps),
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.peak_tflops", t.peak_tflops),
        ("launcher.threads_per_rank", cfg.launcher.threads_per_rank),
        ("dataset.num_workers", cfg.dataset.num_workers),
    ]:
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    m, d = cfg.model, cfg.dataset
    for key, value in [
        ("model.hidden", m.hidden),
        ("model.layers", m.layers),
        ("model.heads", m.heads),
        ("model.ffn_mult", m.ffn_mult),
        ("model.channels", m.channels),
        ("dataset.seq_len", d.seq_len),
        ("dataset.num_samples", d.num_samples),
    ]:
        _positive(key, value)
    if d.num_classes < 2 or d.vocab_size < 2:
        raise ConfigError("dataset.num_classes and dataset.vocab_size must be >= 2")
    if m.name == "transformer" and m.hidden % m.heads:
        raise ConfigError(f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}")
    if t.resume not in ("auto", "never"):
        from experiments.checkpoint import resolve

        try:
            resolve(t.resume, Path("."))
        except FileNotFoundError:
            raise ConfigError(
                f"train.resume={t.resume} holds no complete checkpoint; give a job dir or "
                "<job dir>/checkpoints/step_<N>, or auto | never"
            ) from None
    check_launcher(cfg.launcher)
    if world_size is None:
        world_size = cfg.launcher.nnodes * cfg.launcher.nproc_per_node
    if t.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
        if cfg.launcher.nproc_per_node > torch.cuda.device_count():
            raise ConfigError(
                f"launcher.nproc_per_node={cfg.launcher.nproc_per_node} exceeds the "
                f"{torch.cuda.device_count()} visible GPUs (one device per local rank)"
            )

    spec = get_spec(cfg.strategy.name)
    preset = spec.fixed_reshard
    if preset is not None and cfg.strategy.reshard_after_forward != preset:
        raise ConfigError(
            f"strategy={cfg.strategy.name} means reshard_after_forward={str(preset).lower()}; "
            "use strategy=fsdp to choose it freely"
        )
    if spec.check is not None:
        spec.check(cfg)
    degrees = resolve_degrees(cfg.strategy, world_size)
    check_dataset(cfg.dataset)
    data = dataset_spec(cfg.dataset)
    check_model_fits_data(cfg.model, data)

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
    if spec.needs_tp_plan or spec.pipelined:
        from parallel.plans import check_plans

        check_plans(cfg, degrees, spec)
    return degrees
