"""`make gpu-check`: the CUDA path, exercised end to end in a few minutes, one PASS/FAIL line per check.

NCCL under ddp, fsdp, tp, pp, fsdp_tp and fsdp with context parallelism (torch's ring; each
against one GPU's losses), CUDA memory against
theory (and the peak reset after setup), MFU, bf16 (DataParallel's replica threads included), the
pipeline bubble from CUDA events, the advisor's calibration of this GPU and its prediction for a
job beside the job's measurement, the ranks-per-GPU check and pinned batches. Checks that need
more GPUs than the machine has say SKIP with the number they need. On a machine without CUDA it
says so and exits 0. Exit 1 if any check fails.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

# A tiny GPT: every strategy (TP plans, 4 pipeline blocks) runs it, in seconds.
GPT = [
    "model=transformer",
    "dataset=tokens",
    "model.hidden=64",
    "model.heads=4",
    "model.layers=4",
    "dataset.seq_len=32",
    "dataset.vocab_size=64",
    "dataset.num_samples=512",
    "train.steps=12",
    "train.global_batch_size=16",
    "train.log_every=4",
    "train.measure_every=6",
    "train.device=cuda",
]
PARITY_REL = 1e-4  # fp32 on GPUs: reduction order differs by strategy (CPU/gloo parity is 1e-5)
BF16_REL = 3e-2


class Skip(Exception):
    pass


def _job(root: Path, name: str, *overrides: str) -> dict:
    from experiments.report.parity import run_case

    return run_case([*GPT, *overrides], root / name)


def _launch(world: int) -> list[str]:
    if world == 1:
        return ["launcher=local"]
    return ["launcher=torchrun", f"launcher.nproc_per_node={world}"]


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def _tb(job: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(job / "tb" / "rank0"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def checks(root: Path, gpus: int) -> list[tuple[str, Callable[[], str]]]:
    from experiments.measure.record import Tag
    from parallel.distenv import check_gpus

    ref: dict[str, dict] = {}

    def single(precision: str = "fp32") -> dict:
        if precision not in ref:
            ref[precision] = _job(
                root,
                f"single_{precision}",
                "strategy=single",
                "launcher=local",
                f"train.precision={precision}",
            )
        return ref[precision]

    def nccl(strategy: str, need: int, *extra: str) -> Callable[[], str]:
        def run() -> str:
            world = need if need > 1 else min(gpus, 2)
            if gpus < world:
                raise Skip(f"needs {world} GPUs, {gpus} visible")
            m = _job(root, "_".join([strategy, *extra]), f"strategy={strategy}", *_launch(world), *extra)
            dev = _max_rel(m["losses"], single()["losses"])
            if dev > PARITY_REL:
                raise AssertionError(f"{world} ranks: loss deviates {dev:.2e} from one GPU (> {PARITY_REL})")
            return f"{world} rank(s) over NCCL, losses within {dev:.1e} of one GPU"

        return run

    def memory() -> str:
        world = min(gpus, 2)
        m = _job(root, "zero3_mem", "strategy=zero3", *_launch(world), "train.optimizer=adamw")
        worst = 0.0
        for r in m["ranks"]:
            for cat in Tag.MEMORY_CATEGORIES:
                measured, predicted = r[Tag.mem(cat)], r[Tag.theory_mem(cat)]
                if predicted:
                    worst = max(worst, abs(measured - predicted) / predicted)
            # Parameters, gradients and optimizer state all live at once in the optimizer step.
            held = sum(r[Tag.mem(c)] for c in ("params", "grads", "optim"))
            peak, reserved = r[Tag.CUDA_PEAK], r["mem/cuda_peak_reserved_bytes"]
            if not held <= peak <= reserved:
                raise AssertionError(
                    f"rank {r['rank']}: held {held} ≤ peak {peak} ≤ reserved {reserved} fails"
                )
        if worst > 0.02:
            raise AssertionError(f"model-state memory {worst:.1%} from theory (> 2%)")
        line = f"zero3 on {world}: model state within {worst:.2%} of theory; state ≤ step peak allocated ≤ reserved"
        if world > 1:
            d = _job(root, "ddp_mem", "strategy=ddp", *_launch(world), "train.optimizer=adamw")
            sharded, full = m["ranks"][0][Tag.CUDA_PEAK], d["ranks"][0][Tag.CUDA_PEAK]
            if not sharded < full:
                raise AssertionError(f"zero3's step peak {sharded} is not below ddp's {full}")
            line += f"; step peak zero3 {sharded / 2**20:.1f} MiB < ddp {full / 2**20:.1f} MiB"
        return line

    def mfu() -> str:
        m = _job(
            root,
            "mfu",
            "strategy=ddp",
            *_launch(min(gpus, 2)),
            "train.precision=bf16",
            "train.deterministic=false",
        )
        values = _tb(root / "mfu", Tag.MFU)
        if not values:
            raise Skip(f"no datasheet peak for {torch.cuda.get_device_name()}; set train.peak_tflops")
        if not all(0 < v < 1 for v in values):
            raise AssertionError(f"MFU {values} outside (0, 1)")
        return f"{m['world_size']} rank(s), bf16: MFU {values[-1]:.2%} (a tiny model: low is expected)"

    def bf16() -> str:
        b, f = single("bf16"), single("fp32")
        dev = _max_rel(b["losses"], f["losses"])
        if not 0 < dev < BF16_REL:
            raise AssertionError(f"bf16 vs fp32 losses differ by {dev:.2e}: expected (0, {BF16_REL})")
        return f"autocast bf16 on one GPU: {dev:.1e} from fp32; " + dp_bf16()

    def dp_bf16() -> str:
        from experiments.config.schema import typed_config
        from experiments.report.parity import compose_config
        from parallel.base import StrategyContext
        from parallel.strategies.dataparallel import apply_dp

        cfg = typed_config(compose_config(["strategy=dp", "launcher=local", "train.precision=bf16"]))
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 10)).cuda()
        seen: list[torch.dtype] = []
        model[1].register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        ctx = StrategyContext(cfg, torch.device("cuda", 0), torch.nn.functional.cross_entropy)  # type: ignore[arg-type]
        par = apply_dp(model, None, ctx)  # type: ignore[arg-type]
        par.forward_backward(
            torch.randn(8, 32, device="cuda"), torch.zeros(8, dtype=torch.long, device="cuda"), 1.0, True
        )
        if not seen or any(d != torch.bfloat16 for d in seen):
            raise AssertionError(f"DataParallel replicas computed in {seen}, not bfloat16")
        return f"DataParallel over {par.devices_per_rank} GPU(s): every replica in bf16"

    def bubble() -> str:
        if gpus < 2:
            raise Skip("needs 2 GPUs, 1 visible")
        _job(
            root,
            "pp_bubble",
            "strategy=pp",
            *_launch(2),
            "strategy.schedule=gpipe",
            "strategy.microbatches=4",
            "train.deterministic=false",
        )
        busy, frac = _tb(root / "pp_bubble", Tag.PIPE_BUSY), _tb(root / "pp_bubble", Tag.BUBBLE)
        if not busy or not all(b > 0 for b in busy) or not all(0 <= f < 1 for f in frac):
            raise AssertionError(f"busy {busy}, bubble {frac}")
        return f"gpipe, 2 stages, 4 microbatches: bubble {frac[-1]:.2f} (theory 0.20) from CUDA events"

    def profile_and_snapshot() -> str:
        world = min(gpus, 2)
        m = _job(
            root,
            "ddp_profile",
            "strategy=ddp",
            *_launch(world),
            "train.profile=true",
            "train.memory_snapshot=true",
        )
        r = m["ranks"][0]
        parts = sum(
            v for k, v in r.items() if k.startswith("time/") and k != "time/step" and "overlapped" not in k
        )
        if abs(parts - r["time/step"]) > 1e-6 * r["time/step"] or r["time/compute"] <= 0:
            raise AssertionError(f"the step split does not add up: {parts} of {r['time/step']}")
        snaps = list((root / "ddp_profile" / "memory").glob("rank0_step*.pickle"))
        if not snaps:
            raise AssertionError("no CUDA memory snapshot written")
        return (
            f"NCCL kernels split: compute {1000 * r['time/compute']:.1f} ms of {1000 * r['time/step']:.1f} ms, "
            f"{len(snaps)} memory snapshot(s)"
        )

    def offload() -> str:
        world = min(gpus, 2)
        m = _job(root, "fsdp_offload", "strategy=fsdp", *_launch(world), "strategy.offload=true")
        dev = _max_rel(m["losses"], single()["losses"])
        if dev > PARITY_REL:
            raise AssertionError(f"loss deviates {dev:.2e} from one GPU (> {PARITY_REL})")
        plain = _job(root, "fsdp_plain", "strategy=fsdp", *_launch(world))
        held, without = m["ranks"][0][Tag.CUDA_PEAK], plain["ranks"][0][Tag.CUDA_PEAK]
        if not held < without:
            raise AssertionError(f"offloaded step peak {held} is not below {without} without offload")
        return f"fsdp + CPUOffloadPolicy on {world}: losses within {dev:.1e}; step peak {held / 2**20:.1f} < {without / 2**20:.1f} MiB"

    def activations() -> str:
        gpt = ("strategy=ddp", *_launch(min(gpus, 2)))
        runs = {ac: _job(root, f"ac_{ac}", *gpt, f"train.ac={ac}") for ac in ("none", "full")}
        worst = 0.0
        for m in runs.values():
            for r in m["ranks"]:
                worst = max(worst, abs(r[Tag.ACTIVATIONS] / r[Tag.THEORY_ACTIVATIONS] - 1))
        if worst > 0.02:
            raise AssertionError(f"activations {worst:.1%} from theory (> 2%)")
        if runs["full"]["losses"] != runs["none"]["losses"]:
            raise AssertionError("train.ac=full changed the losses on CUDA")
        peak = {ac: m["ranks"][0][Tag.CUDA_PEAK_FWD_BWD] for ac, m in runs.items()}
        if not peak["full"] < peak["none"]:
            raise AssertionError(
                f"full AC's forward/backward peak {peak['full']} is not below {peak['none']}"
            )
        return (
            f"activations within {worst:.2%} of theory; full AC the same losses, fwd+bwd peak "
            f"{peak['full'] / 2**20:.1f} < {peak['none'] / 2**20:.1f} MiB"
        )

    def advisor() -> str:
        """`make calibrate --quick` on this GPU into its preset's file, then the advisor's
        prediction for a bf16 DDP job beside what the job measured."""
        import json
        import subprocess

        from experiments.plan.cluster import ROOT

        name = torch.cuda.get_device_name().lower()
        preset = next(
            (c for key, c in (("h200", "h200_8"), ("h100", "h100_8"), ("a100", "a100_8")) if key in name),
            None,
        )
        if preset is None:
            raise Skip(f"no cluster preset for {torch.cuda.get_device_name()}: add one to conf/cluster/")
        cmd = [sys.executable, "-m", "experiments.report.calibrate", f"cluster={preset}", "--quick"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        cal = json.loads((ROOT / "calibration" / f"{preset}.json").read_text())
        if not cal["matmul"].get("bf16"):
            raise AssertionError("calibration wrote no bf16 matmul table")
        world = min(gpus, 2)
        m = _job(
            root, "advisor", "strategy=ddp", *_launch(world), "train.precision=bf16", f"cluster={preset}"
        )
        plan = m["plan"]
        if not plan.get("calibrated") or not plan.get("step_time_s"):
            raise AssertionError(f"no calibrated step time in metrics.json's plan: {plan}")
        err = (plan["step_time_s"] - m["step_time_s"]) / m["step_time_s"]
        return (
            f"calibrated {preset} (best bf16 matmul "
            f"{max(2 * a * b * c / t for a, b, c, t in cal['matmul']['bf16']['0']) / 1e12:.0f} TFLOP/s); "
            f"ddp ×{world} step {m['step_time_s'] * 1e3:.1f} ms, predicted {plan['step_time_s'] * 1e3:.1f} ms "
            f"({err:+.0%}; a tiny model: host-bound)"
        )

    def ranks_per_gpu() -> str:
        problem = check_gpus("auto", gpus + 1, gpus)
        if not problem:
            raise AssertionError("train.device=auto with more ranks than GPUs is not refused")
        return f"{gpus + 1} ranks on {gpus} GPU(s) refused: {problem}"

    def pinned() -> str:
        from experiments.train.setup import pinned as pin

        x, y = next(pin(iter([(torch.zeros(4), torch.zeros(4))])))
        if not (x.is_pinned() and y.is_pinned()):
            raise AssertionError("batches are not in pinned memory")
        return "batches are page-locked before their non_blocking copies"

    return [
        ("nccl ddp", nccl("ddp", 0)),
        ("nccl fsdp", nccl("fsdp", 0)),
        ("nccl tp", nccl("tp", 0)),
        ("nccl pp", nccl("pp", 2)),
        ("nccl fsdp_tp", nccl("fsdp_tp", 4)),
        # torch's context_parallel ring over NCCL (CPU runs paralab's own), against one GPU.
        ("nccl fsdp cp (torch context_parallel)", nccl("fsdp", 2, "strategy.cp=2")),
        ("cuda memory vs theory", memory),
        ("fsdp offload", offload),
        ("profile split and memory snapshot", profile_and_snapshot),
        ("activations and checkpointing", activations),
        ("nccl ddp compiled", nccl("ddp", 0, "train.compile=true")),
        ("mfu", mfu),
        ("bf16", bf16),
        ("pipeline bubble", bubble),
        ("advisor: calibrate and predict", advisor),
        ("ranks per gpu", ranks_per_gpu),
        ("pinned batches", pinned),
    ]


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: needs a CUDA GPU and none is visible here; nothing to check")
        return 0
    gpus = torch.cuda.device_count()
    print(
        f"gpu-check: {gpus} × {torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}"
    )
    failed = 0
    with tempfile.TemporaryDirectory(prefix="paralab-gpu-check-") as tmp:
        for name, check in checks(Path(tmp), gpus):
            try:
                print(f"PASS {name}: {check()}", flush=True)
            except Skip as e:
                print(f"SKIP {name}: {e}", flush=True)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - one line per check, the rest goes on
                failed += 1
                print(f"FAIL {name}: {type(e).__name__}: {e}".splitlines()[0], flush=True)
                traceback.print_exc(file=sys.stderr)
    print(f"gpu-check: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
