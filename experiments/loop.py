"""The training loop: setup, then steps under the Meter, then the record. It never sees a strategy's name."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from experiments.config import Config
from experiments.distenv import RankEnv
from experiments.metrics import write_hparams
from experiments.record import RunRecord
from experiments.setup import Run, setup
from experiments.step import train_step


def train(cfg: Config, env: RankEnv, device: torch.device, job_dir: Path, log: logging.Logger) -> float:
    run = setup(cfg, env, device, job_dir, log)
    t, state, meter = cfg.train, run.state, run.meter
    for step in range(state.step + 1, t.steps + 1):
        probe = meter.begin(step)
        result = train_step(
            run.par, state, run.batches, run.norm, t.grad_accum_steps, t.grad_clip, device, probe
        )
        meter.end(step, result)
    meter.stop()
    run.sink.close()
    if t.save_checkpoint:
        from experiments.checkpoint import save_model

        save_model(run.par.model, job_dir)
    return finish(run, job_dir)


def finish(run: Run, job_dir: Path) -> float:
    """Gather every rank's summary on rank 0, which writes metrics.json and the HParams entry."""
    cfg, env, meter = run.cfg, run.env, run.meter
    ranks: list[dict] | None = [None] * env.world_size if env.rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(meter.rank_summary(), ranks, dst=0)
    if env.rank == 0:
        assert ranks is not None
        t, s = cfg.train, cfg.strategy
        pipelined = run.spec.pipelined
        step_time = meter.steady_step_time()
        record = RunRecord(
            strategy=s.name,
            world_size=env.world_size,
            degrees=run.degrees.as_dict(),
            model=cfg.model.name,
            dataset=cfg.dataset.name,
            launcher=cfg.launcher.name,
            optimizer=t.optimizer,
            global_batch_size=t.global_batch_size,
            grad_accum_steps=t.grad_accum_steps,
            precision=t.precision,
            schedule=s.schedule if pipelined else None,
            microbatches=s.microbatches if pipelined else None,
            steps=t.steps,
            params=run.psi,
            losses=meter.losses,
            grad_norms=meter.grad_norms,
            final_loss=meter.losses[-1],
            step_time_s=step_time,
            samples_per_s=t.global_batch_size / step_time,
            tokens_per_s=t.global_batch_size * run.tokens_per_sample / step_time
            if run.tokens_per_sample
            else None,
            wall_s=meter.wall,
            theory=meter.theory,
            ranks=ranks,
            notes=run.par.notes,
            timing_meaningful=meter.timing_meaningful,
            timing_note=meter.timing_note,
        )
        record.write(job_dir)
        write_hparams(job_dir, record)
    return meter.losses[-1]
