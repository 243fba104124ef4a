"""The training loop: setup, then steps under the Meter, then the record. It never sees a strategy's name."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from experiments.config.schema import Config
from experiments.measure.metrics import write_hparams
from experiments.measure.record import RunRecord, write_atomic
from experiments.plan import predict_job
from experiments.train import checkpoint, signals
from experiments.train.evaluate import Evaluator
from experiments.train.setup import Run, setup
from experiments.train.step import train_step
from parallel.distenv import RankEnv


def metered_step(run: Run, step: int) -> bool:
    """One optimizer step under the Meter; True once the ranks have agreed to stop."""
    t = run.cfg.train
    probe = run.meter.begin(step)
    result = train_step(
        run.par, run.state, run.batches, run.norm, t.grad_accum_steps, t.grad_clip, run.device, probe
    )
    return run.meter.end(step, result)


def train(cfg: Config, env: RankEnv, device: torch.device, job_dir: Path, log: logging.Logger) -> float:
    run = setup(cfg, env, device, job_dir, log)
    t, state, meter = cfg.train, run.state, run.meter
    stopped = False
    try:
        meter.start()
        if run.evaluator is not None and owes_evaluation(run.evaluator, state.step, meter.evals):
            # A stop at an evaluation's step skipped it: the resumed run makes it up before going on.
            meter.evaluate(state.step, run.evaluator.run)
        for step in range(state.step + 1, t.steps + 1):
            stopped = metered_step(run, step)
            if run.evaluator is not None and run.evaluator.due(step) and not stopped:
                stopped = meter.evaluate(step, run.evaluator.run)
            if stopped or meter.checkpoints(step):
                t0 = time.perf_counter()
                path = checkpoint.save(state, job_dir, meter.progress(), t.keep_checkpoints)
                seconds = time.perf_counter() - t0
                meter.checkpoint_s += seconds
                log.info("checkpoint %s written in %.3f s", path.name, seconds)
            if stopped:
                break
        meter.stop()
    finally:
        run.close()  # however the loop ended
    if stopped:
        return interrupted(run, job_dir)
    INTERRUPTED.unlink(job_dir)
    return finish(run, job_dir)


def owes_evaluation(evaluator: Evaluator, step: int, evals: list[dict]) -> bool:
    """Whether a run resumed at `step` lacks the evaluation due there."""
    return step > 0 and evaluator.due(step) and all(e["step"] != step for e in evals)


class INTERRUPTED:
    """<job dir>/interrupted.json: this run stopped early and can resume; compare skips it."""

    NAME = "interrupted.json"

    @classmethod
    def write(cls, job_dir: Path, info: dict) -> None:
        write_atomic(job_dir / cls.NAME, json.dumps(info, indent=2))

    @classmethod
    def unlink(cls, job_dir: Path) -> None:
        (job_dir / cls.NAME).unlink(missing_ok=True)


def interrupted(run: Run, job_dir: Path) -> float:
    step = run.state.step
    if run.env.rank == 0:
        reason = signals.requested() or "a stop request"
        INTERRUPTED.write(
            job_dir, {"step": step, "signal": reason, "checkpoint": str(checkpoint.step_dir(job_dir, step))}
        )
        run.meter.log.warning(
            "stopped at step %d on %s with a checkpoint; run the same command again to resume", step, reason
        )
    return run.meter.losses[-1]


def _last_eval(evals: list[dict]) -> dict[str, float | None]:
    last = evals[-1] if evals else {}
    return {k: last.get(k) for k in ("val_loss", "val_acc", "val_ppl")}


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
            strategy=run.spec.record_name(s),
            world_size=env.world_size,
            degrees=run.degrees.as_dict(),
            model=cfg.model.label,
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
            checkpoint_s=meter.checkpoint_s,
            theory=meter.theory,
            ranks=ranks,
            notes=run.par.notes,
            resumes=meter.resumes,
            timing_meaningful=meter.timing_meaningful,
            timing_note=meter.timing_note,
            evals=meter.evals,
            **_last_eval(meter.evals),
            ac=t.ac,
            ac_every=t.ac_every,
            compile=t.compile,
            first_step_s=meter.first_step_s,
            compile_s=meter.first_step_s - step_time if t.compile else None,
            seq_len=run.tokens_per_sample,
            experts=int(cfg.model.get("experts", 0) or 0),
            plan=predict_job(cfg, run.degrees, run.data) if t.predict else None,
        )
        record.write(job_dir)
        write_hparams(job_dir, record)
    return meter.losses[-1]
