"""One Hydra job: validate, freeze the config into the job dir, launch the ranks, return the objective."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from data.checks import DataUnavailable, fetch
from experiments.config.schema import FROZEN_CONFIG, Config, ConfigError, save_frozen, typed_config
from experiments.measure.record import METRICS_FILE, RunRecord
from experiments.run import worker
from experiments.run.jobdir import check_name, swept_keys, undo_hydra
from experiments.run.keys import check_known, override_keys
from experiments.run.launch import launch
from experiments.run.nodes import PER_NODE, first_difference
from experiments.run.rendezvous import check_endpoint
from experiments.run.resources import check_resources
from experiments.run.slurm import place_on_allocation, save_at_usr2, swept_keys_from_env, under_submitit
from experiments.run.validate import check_auto_resume, check_resume_source, validate
from experiments.train.checkpoint import resolve


def subdir_name(
    task_overrides: Sequence[str], sweeper_params: Mapping[str, object] | None, job_num: int
) -> str:
    """hydra.sweep.subdir: the swept overrides of this job, in the user's order, '/' made safe.

    "strategy=fsdp,launcher.nproc_per_node=4" reads better in TensorBoard than every fixed override.
    """
    by_key = {o.split("=", 1)[0].lstrip("+~"): o.lstrip("+~") for o in task_overrides}
    swept = swept_keys_from_env() or swept_keys(sys.argv[1:], sweeper_params)
    keys = [k for k in swept if k in by_key] or list(by_key)
    name = ",".join(by_key[k] for k in keys if k != "experiment") or f"job{job_num}"
    return name.replace("/", "_")


# What a run leaves in its job dir: none of it is ever overwritten by another run.
RESULTS = (METRICS_FILE, "tb", "checkpoints")

# Keys that may differ from the config already in the job dir: a longer run, another source, and
# the node of a multi-node job (every node's agent shares the one job dir).
# A rerun (a requeued SLURM job) may meet at another rendezvous.
RERUN_MAY_CHANGE = {
    ("train", "steps"),
    ("train", "resume"),
    ("launcher", "rdzv_endpoint"),
    ("launcher", "rdzv_id"),
    *PER_NODE,
}


def check_rerun(cfg: DictConfig, job_dir: Path) -> float | None:
    """A job dir that already holds a run: the same config continues it (resume); another is refused.

    Returns the objective when that run already finished every step (nothing to do), else None.
    """
    frozen = job_dir / FROZEN_CONFIG
    results = [n for n in RESULTS if (job_dir / n).exists()]
    if not frozen.is_file():
        if results:
            raise ConfigError(
                f"{job_dir} holds {results[0]} but no {FROZEN_CONFIG}: not a run paralab can continue; "
                "use a new hydra.run.dir"
            )
        return None
    old = OmegaConf.to_container(OmegaConf.load(frozen))
    new = OmegaConf.to_container(cfg, resolve=True)
    new.pop("hydra", None)  # type: ignore[union-attr]
    diff = first_difference(old, new, RERUN_MAY_CHANGE)
    if diff is not None:
        key = ".".join(diff)
        raise ConfigError(
            f"{job_dir} holds a run with another {key} ({OmegaConf.select(OmegaConf.create(old), key)} "
            f"there, {OmegaConf.select(cfg, key)} now); use a new hydra.run.dir, or "
            f"train.resume={job_dir} in a new one to start from its checkpoint"
        )
    if (job_dir / METRICS_FILE).is_file():
        record = RunRecord.read(job_dir)
        if record.steps >= cfg.train.steps and len(record.losses) >= cfg.train.steps:
            return record.objective(cfg.train.objective)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun's own restart
    if results and not restarted and cfg.train.resume != "auto":
        raise ConfigError(
            f"{job_dir} holds a run with results, and train.resume={cfg.train.resume} would start another "
            "run over them: use a new hydra.run.dir (train.resume=<this dir> there starts from its checkpoint)"
        )
    return None


def stopped_before_first_checkpoint(cfg: DictConfig, job_dir: Path) -> bool:
    """The same run, stopped (preempted, cancelled, killed) before it saved a checkpoint: its
    rerun under resume=auto starts it again from step 0 in its own dir."""
    results = [n for n in RESULTS if (job_dir / n).exists()]
    return bool(results) and cfg.train.resume == "auto" and resolve("auto", job_dir) is None


def set_aside(job_dir: Path) -> Path:
    """Move what the stopped run wrote into <job dir>/stopped_<n>/: kept, and out of the new run's way."""
    n = 1
    while (job_dir / f"stopped_{n}").exists():
        n += 1
    aside = job_dir / f"stopped_{n}"
    aside.mkdir()
    for name in RESULTS:
        if (job_dir / name).exists():
            (job_dir / name).rename(aside / name)
    return aside


# Jobs of this process's sweep that were rejected and that ran: a sweep of only rejected jobs fails.
outcomes = {"rejected": 0, "ran": 0}


def _typed(cfg: DictConfig) -> Config:
    """The typed config; a key with no value (a deleted group, `~model`) is a refusal naming it."""
    try:
        return typed_config(cfg)
    except MissingMandatoryValue as e:
        key = e.full_key or "a required key"
        raise ConfigError(
            f"{key} has no value (a deleted or unset config group?); choose one, e.g. {key}=<option> "
            "(python train.py --help lists them)"
        ) from None


def group_file(hc, group: str) -> str:
    """The config file the group's option was read from (a user's, through hydra.searchpath)."""
    choice = hc.runtime.choices.get(group)
    for source in hc.runtime.config_sources:
        if source.schema == "file" and (path := Path(source.path) / group / f"{choice}.yaml").exists():
            return str(path)
    return f"{group}/{choice}.yaml"


def run_job(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    external = worker.launched_by_external_torchrun()
    try:
        if external and multirun:
            raise ConfigError(
                "-m under a hand-started torchrun would run the sweep on every rank; "
                "use `python train.py -m ... launcher=torchrun` instead"
            )
        if under_submitit():
            place_on_allocation(cfg)
        if external:
            # The world already exists: record it as it is rather than as the config guessed it.
            local = int(os.environ["LOCAL_WORLD_SIZE"])
            with open_dict(cfg):
                cfg.launcher.name = "torchrun"
                cfg.launcher.nproc_per_node = local
                cfg.launcher.nnodes = int(os.environ["WORLD_SIZE"]) // local
        check_name(job_dir)
        check_known(cfg)
        typed = _typed(cfg)
        typed.model = dataclasses.replace(typed.model, source=group_file(hc, "model"))
        # What the job dir holds comes first: a strategy that cannot load its checkpoint is refused
        # for that, whatever else (an extra not installed) it would also need.
        finished = check_rerun(cfg, job_dir)
        if finished is None:
            check_auto_resume(typed, job_dir)
        degrees = validate(typed, explicit=override_keys(hc.overrides.task))
        check_endpoint(typed.launcher)
        if finished is None:
            check_resume_source(typed, job_dir)
            check_resources(typed, degrees, job_dir)
        fetch(typed.dataset)
    except (ConfigError, DataUnavailable) as e:
        config_error = isinstance(e, ConfigError)
        print(f"paralab: {'config error: ' if config_error else ''}{e}", file=sys.stderr)
        undo_hydra(job_dir)
        if external:
            worker.publish_job_dir(None)
        if multirun and config_error:
            outcomes["rejected"] += 1
            print(f"paralab: skipped job {job_dir.name}", file=sys.stderr)
            return None
        sys.exit(2 if config_error else 1)

    outcomes["ran"] += 1
    restart = (
        finished is None
        and typed.launcher.node_rank == 0  # the other nodes of a job find the dir already cleared
        and not external
        and stopped_before_first_checkpoint(cfg, job_dir)
    )
    if restart:
        aside = set_aside(job_dir)
        print(
            f"paralab: {job_dir} was stopped before its first checkpoint: starting it again from step 0 "
            f"(what it wrote is kept in {aside.name}/)",
            file=sys.stderr,
        )
    if finished is not None:
        print(f"paralab: {job_dir} is finished: all {typed.train.steps} steps are done; nothing to do")
        if external:
            worker.publish_job_dir(None)
        return finished
    if external:
        save_frozen(cfg, job_dir)
        worker.publish_job_dir(job_dir)
        return worker.main(str(job_dir))
    with save_at_usr2():
        return execute(cfg, typed, job_dir)


def execute(cfg: DictConfig, typed: Config, job_dir: Path) -> float | None:
    """Freeze a validated config into `job_dir`, launch its ranks, return the job's objective.

    Hydra hands this value to the sweeper (train.objective: val_loss, train_loss, samples_per_s).
    """
    frozen = save_frozen(cfg, job_dir)
    launch(typed.launcher, job_dir, frozen)
    if not (job_dir / METRICS_FILE).exists():
        return None
    return RunRecord.read(job_dir).objective(typed.train.objective)
