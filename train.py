"""paralab entry point: `python train.py strategy=ddp launcher=torchrun` (add -m to sweep)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.config import register_configs
from experiments.job import run_job, subdir_name

register_configs()
OmegaConf.register_new_resolver("paralab_subdir", subdir_name, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


if __name__ == "__main__":
    from experiments import worker
    from experiments.slurm import check_submitit_installed

    check_submitit_installed(sys.argv[1:])
    # Started by hand under torchrun: only rank 0 runs Hydra (one job dir); the others follow it.
    if worker.launched_by_external_torchrun() and worker.rank_env().rank != 0:
        sys.exit(worker.follow_rank0())
    main()
