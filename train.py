"""paralab entry point: `python train.py strategy=ddp launcher=torchrun` (add -m to sweep)."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.config.schema import register_configs
from experiments.run.job import outcomes, run_job, subdir_name

register_configs()
OmegaConf.register_new_resolver("paralab_subdir", subdir_name, replace=True)


# Absolute, so the same entry point also composes when imported (the tests call cli() in-process).
@hydra.main(
    version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="config"
)
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


def cli() -> int:
    """Run Hydra; a compose error (wrong key, value, option) is one line and exit code 2."""
    from experiments.config.compose_errors import COMPOSE_ERRORS, compose_error_line
    from experiments.run.jobdir import undo_sweep
    from experiments.run.slurm import SUBMISSION_ERRORS, submission_error_line

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing them
    outcomes.update(rejected=0, ran=0)
    try:
        main()
    except COMPOSE_ERRORS as e:
        print(f"paralab: config error: {compose_error_line(e)}", file=sys.stderr)
        return 2
    except SUBMISSION_ERRORS as e:  # sbatch refused the sweep's jobs
        print(f"paralab: {submission_error_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # the job dir cannot be written: a full disk, no permission, a read-only mount
        where = f" ({e.filename})" if e.filename else ""
        advice = "free space and run again" if e.errno == errno.ENOSPC else "use another hydra.run.dir"
        print(f"paralab: {e.strerror or e}{where}; {advice}", file=sys.stderr)
        return 1
    if outcomes["rejected"] and not outcomes["ran"]:
        undo_sweep()
        print(
            f"paralab: every job of the sweep ({outcomes['rejected']}) was rejected; nothing ran",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    from experiments.run import worker
    from experiments.run.slurm import check_submitit_installed

    check_submitit_installed(sys.argv[1:])
    # Started by hand under torchrun: only rank 0 runs Hydra (one job dir); the others follow it.
    if worker.launched_by_external_torchrun() and worker.rank_env().rank != 0:
        sys.exit(worker.follow_rank0())
    sys.exit(cli())
