"""One Hydra job: validate, freeze the config into the job dir, launch the ranks, return the objective."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments import worker
from experiments.config import Config, ConfigError, save_frozen
from experiments.metrics import METRICS_FILE, read_metrics
from experiments.validate import validate
from parallel.launch import launch


def subdir_name(override_dirname: str, job_num: int) -> str:
    """hydra.sweep.subdir: the job's overrides, with '/' made safe so each job is one directory."""
    return override_dirname.replace("/", "_") if override_dirname else f"job{job_num}"


def _discard_if_fresh(job_dir: Path) -> None:
    # A rejected job leaves no directory behind, unless it already held something of the user's.
    if {p.name for p in job_dir.iterdir()} <= {".hydra", "train.log"}:
        import shutil

        shutil.rmtree(job_dir, ignore_errors=True)


def run_job(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    external = worker.launched_by_external_torchrun()
    try:
        if external and multirun:
            raise ConfigError("-m under a hand-started torchrun would run the sweep on every rank; "
                              "use `python train.py -m ... launcher=torchrun` instead")
        if external:
            # The world already exists: record it as it is rather than as the config guessed it.
            local = int(os.environ["LOCAL_WORLD_SIZE"])
            with open_dict(cfg):
                cfg.launcher.name = "torchrun"
                cfg.launcher.nproc_per_node = local
                cfg.launcher.nnodes = int(os.environ["WORLD_SIZE"]) // local
        typed: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        validate(typed)
    except ConfigError as e:
        print(f"paralab: config error: {e}", file=sys.stderr)
        _discard_if_fresh(job_dir)
        if external:
            worker.publish_job_dir(None)
        if multirun:
            print(f"paralab: skipped job {hc.job.override_dirname}", file=sys.stderr)
            return None
        sys.exit(2)

    save_frozen(cfg, job_dir)
    if external:
        worker.publish_job_dir(job_dir)
        return worker.main(str(job_dir))
    launch(typed.launcher, job_dir)
    if typed.launcher.name == "slurm" or not (job_dir / METRICS_FILE).exists():
        return None
    return read_metrics(job_dir)["final_loss"]
