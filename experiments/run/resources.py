"""Will the job fit this machine? Ranks vs devices and open files, predicted memory vs memory,
checkpoints vs disk: checked before launch, and a refusal says what does fit.

The bytes are the advisor's count of the fullest rank (experiments/plan/predict.py's rank_memory):
model state by the run-time theory (parallel/costs.py: what the strategy's implementation holds,
DeepSpeed's fp32 master partition included) on each pipeline and TP rank's own parameters, counted
on a meta-device model (nothing is allocated); activations (experiments/measure/activation_theory.py)
for the micro-batches the schedule keeps in flight; buffers and the process itself. The same
counts the run logs as `theory/mem/*` and metrics.json's `plan`, which test_measure checks
against what each rank holds. torch's own workspace comes on top, so a job that passes can
still run out of memory; one that fails cannot run.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from experiments.config.schema import Config, ConfigError
from models import HEADED
from parallel.distenv import uses_cuda
from parallel.mesh import Degrees

GiB = 2**30
# Open files the launcher keeps per local rank (pipes, error files, process sentinels).
FDS_PER_RANK = 12
FDS_SPARE = 64
# The key that sizes each model, for "what fits" (resnet18 has a fixed size).
# The argument whose size the advice lowers, by model class.
SIZE_KNOBS = {
    "models.mlp.MLP": "hidden",
    "models.transformer.Transformer": "hidden",
    "models.llama.Llama": "hidden",
    "models.cnn.CNN": "channels",
}


def check_resources(cfg: Config, degrees: Degrees, job_dir: Path) -> None:
    local = cfg.launcher.nproc_per_node
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fits = (soft - FDS_SPARE) // FDS_PER_RANK
    if soft != resource.RLIM_INFINITY and local > fits:
        raise ConfigError(
            f"launcher.nproc_per_node={local} needs ~{local * FDS_PER_RANK + FDS_SPARE} open files, "
            f"and `ulimit -n` is {soft}: at most {fits} ranks fit (or raise the limit)"
        )
    # Ranks against GPUs: validate's distenv.check_gpus, which runs first.
    cuda = uses_cuda(cfg.train.device)
    _check_dataset_memory(cfg, local)
    _check_memory(cfg, degrees, local, cuda)
    _check_disk(cfg, job_dir)


def _check_dataset_memory(cfg: Config, local: int) -> None:
    from data import memory_bytes

    d = cfg.dataset
    held = memory_bytes(d)
    have = _available_ram()
    if local * held > have:
        raise ConfigError(
            f"dataset={d.name} holds ~{held / GiB:.1f} GiB in each rank's memory (dataset.num_samples={d.num_samples} "
            f"+ dataset.val_samples={d.val_samples}); {local} ranks need ~{local * held / GiB:.1f} GiB, "
            f"{have / GiB:.1f} GiB available: lower dataset.num_samples or dataset.val_samples"
        )


def rank_bytes(cfg: Config, degrees: Degrees) -> dict[str, float]:
    """The fullest rank's bytes by category (params, params_gathered, grads, optim, activations,
    buffers) as the advisor counts them (experiments/plan/predict.py's rank_memory): each pipeline
    and TP rank's own parameters, the schedule's micro-batches in flight, the process itself."""
    from data import dataset_spec
    from experiments.plan.predict import rank_memory
    from experiments.plan.profile import profile_of

    data = dataset_spec(cfg.dataset)
    layout = profile_of(cfg.model, data, ops=False)
    return rank_memory(cfg, degrees, layout, data, not uses_cuda(cfg.train.device)).worst


def model_state_bytes_per_rank(cfg: Config, degrees: Degrees) -> float:
    """Parameters, gradients and optimizer state on the fullest rank."""
    from experiments.plan.predict import model_state_bytes

    return model_state_bytes(rank_bytes(cfg, degrees))


def activation_bytes_per_rank(cfg: Config, degrees: Degrees) -> float:
    """What autograd keeps on the fullest rank at its peak (a pipeline's micro-batches in flight);
    0 where the model's count is not known."""
    return rank_bytes(cfg, degrees)["activations"]


def parameter_count(cfg: Config) -> int:
    return sum(p.numel() for p in meta_model(cfg).parameters())


def meta_model(cfg: Config) -> nn.Module:
    from data import dataset_spec
    from models import meta_model as build_on_meta

    return build_on_meta(cfg.model, dataset_spec(cfg.dataset))


def _check_memory(cfg: Config, degrees: Degrees, local: int, cuda: bool) -> None:
    from experiments.plan.predict import model_state_bytes

    held = rank_bytes(cfg, degrees)
    acts, base, state = held["activations"], held["buffers"], model_state_bytes(held)
    have = (
        min(torch.cuda.get_device_properties(i).total_memory for i in range(local))
        if cuda
        else _available_ram()
    )
    need = _need_of(sum(held.values()), local, cuda)
    if need <= have:
        return
    model = (
        f"{state / GiB:.2f} GiB of model state per rank: {parameter_count(cfg):,} parameters, "
        f"strategy={cfg.strategy.name}, {cfg.train.optimizer}"
    )
    if acts:
        model += f"; {acts / GiB:.2f} GiB of activations per rank (train.ac={cfg.train.ac})"
    model += f"; {base / GiB:.2f} GiB of buffers and the process itself"
    if cuda:
        said = f"{model}; each GPU has {have / GiB:.1f} GiB"
    else:
        said = f"{local} ranks need ~{need / GiB:.1f} GiB of RAM ({model}), {have / GiB:.1f} GiB available"
    fits = lambda c: _need(c, degrees, local, cuda) <= have  # noqa: E731
    hint = _levers_that_fit(cfg, degrees, fits) + _what_fits(cfg, degrees, fits)
    ranks = int(have // sum(held.values()))
    if not cuda and ranks >= 1:
        hint.append(f"launcher.nproc_per_node <= {ranks}")
    raise ConfigError(
        f"{said}; what fits: {' or '.join(hint) or 'a smaller model, or more ranks to shard it'}"
    )


def _need(cfg: Config, degrees: Degrees, local: int, cuda: bool) -> float:
    return _need_of(sum(rank_bytes(cfg, degrees).values()), local, cuda)


def _need_of(per_rank: float, local: int, cuda: bool) -> float:
    """Each GPU holds one rank; a CPU node's RAM holds all its local ranks."""
    return per_rank if cuda else local * per_rank


def _levers_that_fit(cfg: Config, degrees: Degrees, fits: Callable[[Config], bool]) -> list[str]:
    """Full activation checkpointing, or the largest global batch that fits, where either does."""
    import dataclasses

    from experiments.config.schema import AC

    t = cfg.train
    out = []
    if t.ac != AC.full and fits(
        dataclasses.replace(cfg, train=dataclasses.replace(t, ac=AC.full, ac_every=1))
    ):
        out.append("train.ac=full")
    step = degrees.dp * t.grad_accum_steps

    def batched(n: int) -> Config:
        return dataclasses.replace(cfg, train=dataclasses.replace(t, global_batch_size=n * step))

    lo, hi = 0, t.global_batch_size // step - 1
    while lo < hi:  # the largest multiple n of `step` below the asked batch that fits; 0 if none
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(batched(mid)) else (lo, mid - 1)
    if lo:
        out.append(f"train.global_batch_size <= {lo * step}")
    return out


def _what_fits(cfg: Config, degrees: Degrees, fits: Callable[[Config], bool]) -> list[str]:
    """The largest model.hidden (or model.channels) that fits, found on meta-device models."""
    import dataclasses

    m = cfg.model
    knob = SIZE_KNOBS.get(m.target)
    if knob is None or knob not in m.args:
        return []
    step = 1
    if knob == "hidden" and m.target in HEADED:
        # Whole heads; llama's rotary positions also need an even head size.
        step = m.args["heads"] * degrees.tp * (2 if m.target == "models.llama.Llama" else 1)
    step = math.lcm(step, degrees.tp) if knob == "hidden" else step

    def sized(n: int) -> Config:
        return dataclasses.replace(cfg, model=dataclasses.replace(m, args={**m.args, knob: n * step}))

    lo, hi = 0, max(1, m.args[knob] // step)
    while lo < hi:  # the largest multiple n of `step` with sized(n) fitting; 0 if none does
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(sized(mid)) else (lo, mid - 1)
    return [f"model.{knob} <= {lo * step}"] if lo else []


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def checkpoints_on_disk(steps: int, every: int, keep: int) -> int:
    """The most checkpoints a run holds at once: the newest `keep` (0 = all) of those it writes
    (every `every` steps and the final one), plus the one being written while they stay."""
    written = (steps // every if every else 0) + (0 if every and steps % every == 0 else 1)
    kept = min(keep or written, written)
    return kept + (1 if kept < written else 0)


def _check_disk(cfg: Config, job_dir: Path) -> None:
    """Checkpoints hold the whole model and optimizer state (checkpoints_on_disk of them)."""
    from parallel.costs import optimizer_state_bytes_per_param

    t = cfg.train
    kept = checkpoints_on_disk(t.steps, t.checkpoint_every, t.keep_checkpoints)
    need = parameter_count(cfg) * (4 + optimizer_state_bytes_per_param(cfg)) * kept + 2**20
    existing = next((p for p in (job_dir, *job_dir.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ConfigError(
            f"the disk holding {job_dir} has {free / 2**20:.0f} MiB free; this run's checkpoints need "
            f"~{need / 2**20:.0f} MiB (train.keep_checkpoints={t.keep_checkpoints}); free space or use another hydra.run.dir"
        )


# Below this, a write can fail any moment: a disk this full explains an error that names another cause.
DISK_FULL_BYTES = 16 * 2**20


def disk_full(path: Path) -> str | None:
    """One line saying the disk holding `path` is full, or None when it is not."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    if free >= DISK_FULL_BYTES:
        return None
    return f"the disk holding {path} is full ({free / 2**20:.1f} MiB free); free space and run the same command to resume"
