"""paralab's training loop against a minimal hand-written loop of the same strategy.

Run under torchrun on 2 ranks (`make bench`, or `make bench ARGS="--strategies ddp --sizes small
--repeats 3"`). For each strategy (ddp, fsdp, tp) and size (small: overhead-bound; compute:
compute-bound) it runs, in turn within each repeat, paralab's loop as shipped (TensorBoard, timers,
loss and grad-norm reductions, comm/memory sampling on step 3 and every 50) and a hand-written
loop: the same model, data, batch and SGD, wrapped as a user would by hand. Then it builds both
once and alternates short chunks of steps (steady_pairs). It prints one row per case: median loop
wall times, the throughput ratio hand/paralab (the median of each repeat's paired ratio), the same
ratio in steady state with its 95 % confidence interval, the target and whether that interval
clears it (met), falls short of it (missed) or straddles it (unsure), and the share of paralab's
time its sampled steps cost, with its interval and verdict against < 2 %. Targets are printed,
never enforced: a benchmark on a shared machine gates nothing.

Then (`--parts compile`) paralab's own loop with train.compile against without, for ddp and fsdp:
the steady step-time ratio measured in one run, and the compile's one-time cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import parallelize_module
from torch.nn.parallel import DistributedDataParallel

from data import build_dataset, dataset_spec
from experiments.config.schema import Config, typed_config
from experiments.measure.log import setup_rank_logging
from experiments.measure.record import RunRecord
from experiments.report.parity import compose_config
from experiments.run.validate import validate
from experiments.train.loop import metered_step, train
from experiments.train.meter import timing_check
from experiments.train.setup import setup
from models import build_model
from parallel.distenv import rank_env, set_threads

DEVICE = torch.device("cpu")


# ---- the hand-written loops: what a user writes without paralab ----


def fresh_model(cfg: Config) -> nn.Module:
    """The model paralab builds: same seed, so the same initial weights."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, dataset_spec(cfg.dataset))


class HandLoop:
    """Forward, cross-entropy, backward, SGD step; this rank's slice of a shuffled global batch."""

    def __init__(self, model: nn.Module, cfg: Config, dp_rank: int, dp_size: int) -> None:
        t = cfg.train
        self.model, self.steps = model, t.steps
        self.x, self.y = build_dataset(cfg.dataset, cfg.seed).tensors  # type: ignore[attr-defined]
        self.opt = torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
        )
        self.batch, self.local = t.global_batch_size, t.global_batch_size // dp_size
        self.offset = dp_rank * self.local
        self.per_epoch = len(self.x) // self.batch
        self.order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(cfg.seed))
        self.done = 0

    def step(self) -> None:
        start = (self.done % self.per_epoch) * self.batch + self.offset
        idx = self.order[start : start + self.local]
        loss = F.cross_entropy(self.model(self.x[idx]), self.y[idx])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.done += 1

    def timed(self) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(self.steps):
            self.step()
        return time.perf_counter() - t0


def hand_ddp(cfg: Config, mesh: DeviceMesh) -> HandLoop:
    """DistributedDataParallel: a replica per rank, each on its half of the batch."""
    model = DistributedDataParallel(fresh_model(cfg))
    return HandLoop(model, cfg, mesh.get_local_rank(), mesh.size())


def hand_fsdp(cfg: Config, mesh: DeviceMesh) -> HandLoop:
    """FSDP2: fully_shard each block, then the root (with fully_shard's defaults)."""
    model = fresh_model(cfg)
    for block in model.blocks.values():  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return HandLoop(model, cfg, mesh.get_local_rank(), mesh.size())


def hand_tp(cfg: Config, mesh: DeviceMesh) -> HandLoop:
    """Tensor parallel with the model's own plan on each block; every rank sees the whole batch."""
    model = fresh_model(cfg)
    plan = model.tp_plan(False)  # type: ignore[operator]
    for block in model.blocks.values():  # type: ignore[union-attr]
        parallelize_module(block, mesh, plan)
    return HandLoop(model, cfg, 0, 1)


# paralab's strategy=<name> and the hand-written loop it is measured against.
STRATEGIES: dict[str, Callable[[Config, DeviceMesh], HandLoop]] = {
    "ddp": hand_ddp,
    "fsdp": hand_fsdp,
    "tp": hand_tp,
}


@dataclass(frozen=True)
class Size:
    overrides: tuple[str, ...]
    steps: int
    target: float  # the hand/paralab throughput ratio paralab aims for at this size
    chunk: int  # steps per chunk of the steady-state comparison
    pairs: int  # paired chunks per repeat: enough to bound the steady ratio to about ±2 %


SIZES: dict[str, Size] = {
    # Tiny steps (a few ms): the loop's own per-step overhead shows.
    "small": Size(
        ("model.hidden=64", "model.layers=4", "dataset.input_shape=[32]", "train.global_batch_size=64"),
        steps=600,
        target=0.95,
        chunk=10,  # one log interval: each paralab chunk holds one reduction and its read
        pairs=40,
    ),
    # ~0.1 s steps on a 2-core CPU box (one loop ~2-4 s): the overhead should vanish.
    "compute": Size(
        ("model.hidden=512", "model.layers=4", "dataset.input_shape=[256]", "train.global_batch_size=256"),
        steps=25,
        target=0.99,
        chunk=3,
        pairs=8,
    ),
}


# ---- paralab's loop ----


def paralab_loop(cfg: Config, job: Path, log) -> float:
    """paralab's training loop, built from cfg as train.py builds it; rank 0's loop wall time."""
    job.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    train(cfg, rank_env(), DEVICE, job, log)
    return RunRecord.read(job).wall_s if dist.get_rank() == 0 else 0.0


class Pair(NamedTuple):
    """Rank 0's seconds for one chunk of each loop, run back to back."""

    hand: float
    paralab: float
    sampled: bool  # paralab's chunk holds a sampled step (comm counter, memory probes)


def steady_pairs(cfg: Config, mesh: DeviceMesh, job: Path, log, chunks: int, chunk: int) -> list[Pair]:
    """Rank 0's seconds per chunk, in one process: paralab's loop body (a step under the Meter, with
    its log and sampled steps as shipped) against the hand loop's step, alternating.

    The whole-run ratio also carries what differs from run to run (process and allocator state,
    a rank's start): on a shared 2-core machine that moves it by a few percent. Here both loops
    are built once and warm, so what is left is what paralab adds to each step.
    """
    hand = STRATEGIES[cfg.strategy.name](cfg, mesh)
    endless = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=10**9))
    job.mkdir(parents=True, exist_ok=True)
    run = setup(endless, rank_env(), DEVICE, job, log)
    step = 0

    def paralab_chunk() -> None:
        nonlocal step
        for _ in range(chunk):
            step += 1
            metered_step(run, step)

    def sampled() -> bool:
        """Whether the chunk just run held a sampled step."""
        return any(run.meter.sampled(s) for s in range(step - chunk + 1, step + 1))

    def hand_chunk() -> None:
        for _ in range(chunk):
            hand.step()

    try:
        run.meter.start()
        paralab_chunk()  # warm-up: lazy init, DDP's bucket rebuild, first sample
        hand_chunk()
        pairs = []
        for i in range(chunks):
            seconds = {}
            for name, body in sorted(
                {"paralab": paralab_chunk, "hand": hand_chunk}.items(), reverse=i % 2 == 1
            ):
                dist.barrier()
                t0 = time.perf_counter()
                body()
                seconds[name] = rank0(time.perf_counter() - t0)
            pairs.append(Pair(seconds["hand"], seconds["paralab"], sampled()))
        return pairs
    finally:
        run.close()


def case_config(strategy: str, size: Size, steps: int, extra: list[str]) -> Config:
    """paralab as shipped, on this size's model."""
    overrides = [
        "model=mlp",
        "dataset=synthetic",
        f"strategy={strategy}",
        *size.overrides,
        f"train.steps={steps}",
    ]
    cfg = typed_config(compose_config([*overrides, *extra]))
    world = dist.get_world_size()
    cfg = dataclasses.replace(cfg, launcher=dataclasses.replace(cfg.launcher, nproc_per_node=world))
    validate(cfg, world)
    return cfg


def rank0(value: float) -> float:
    """Rank 0's value on every rank."""
    t = torch.tensor(value, dtype=torch.float64)
    dist.broadcast(t, 0)
    return t.item()


# ---- the table ----

VARIANTS = ("paralab", "hand")
HEADER = (
    f"{'strategy':<8} {'size':<8} {'steps':>5}  {'paralab s':>9} {'hand s':>8}"
    f"  {'hand/paralab':>12} {'steady':>12} {'target':>7}        {'sampling':>13} {'< 2%':<6} {'stalled':>9}"
)
SAMPLING_TARGET = 0.02  # of paralab's time, at the default train.measure_every


def paired(walls: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repeats of a/b within each repeat: the variants of one repeat ran back to back,
    so a drift in the machine's speed between repeats cancels out of each ratio."""
    return statistics.median(x / y for x, y in zip(walls[a], walls[b], strict=True))


# A chunk that takes this many times its loop's median was stalled by the machine (another tenant,
# a page-cache flush), not by either loop: paralab's slowest chunks (a sampled step with the comm
# counter) take 1.2 to 1.4 times its median.
STALLED = 3.0


def unstalled(pairs: list[Pair]) -> tuple[list[Pair], int]:
    """The pairs whose chunks ran at the machine's pace, and how many were left out."""
    medians = [statistics.median(p.hand for p in pairs), statistics.median(p.paralab for p in pairs)]
    kept = [p for p in pairs if p.hand <= STALLED * medians[0] and p.paralab <= STALLED * medians[1]]
    return kept, len(pairs) - len(kept)


def interval(pairs: list[Pair]) -> tuple[float, float, int]:
    """hand/paralab over the paired chunks: total time over total time (the throughput ratio, which
    a mean of per-chunk ratios overstates when a few chunks are slowed a lot), the half-width of its
    95 % confidence interval (the delta method for a ratio of means), and how many pairs were left
    out because one of their chunks stalled (a single stall of a second would move a 200-pair
    total by several percent either way)."""
    kept, left_out = unstalled(pairs)
    hand, paralab = [p.hand for p in kept], [p.paralab for p in kept]
    ratio = sum(hand) / sum(paralab)
    if len(kept) < 2:
        return ratio, math.inf, left_out
    spread = statistics.stdev(h - ratio * p for h, p in zip(hand, paralab, strict=True))
    return ratio, 1.96 * spread / (math.sqrt(len(kept)) * statistics.fmean(paralab)), left_out


def sampling_cost(pairs: list[Pair]) -> tuple[float, float]:
    """The share of paralab's time its sampled steps add, with the half-width of its 95 % interval.

    A sampled chunk's extra time is its paralab - hand difference less that of the chunks without
    a sample (pairing cancels the machine's drift); the share is that extra, times the sampled
    chunks, over paralab's total. Two whole runs, sampled and not, differ by more than that from
    run to run on this machine; within one run the estimate is tight enough to test < 2 %.
    """
    kept, _ = unstalled(pairs)
    with_sample = [p.paralab - p.hand for p in kept if p.sampled]
    without = [p.paralab - p.hand for p in kept if not p.sampled]
    if len(with_sample) < 2 or len(without) < 2:
        return math.nan, math.inf
    scale = len(with_sample) / sum(p.paralab for p in kept)
    extra = statistics.fmean(with_sample) - statistics.fmean(without)
    se = math.sqrt(
        statistics.variance(with_sample) / len(with_sample) + statistics.variance(without) / len(without)
    )
    return extra * scale, 1.96 * se * scale


def verdict(value: float, half: float, target: float, at_most: bool = False) -> str:
    """Met or missed only where the whole interval says so: noise on a shared machine can say neither.
    The target is a floor (a throughput ratio), or with at_most a ceiling (a cost)."""
    low, high = value - half, value + half
    if (high <= target) if at_most else (low >= target):
        return "met"
    if (low > target) if at_most else (high < target):
        return "missed"
    return "unsure"


def row(
    strategy: str,
    size_name: str,
    size: Size,
    steps: int,
    walls: dict[str, list[float]],
    pairs: list[Pair],
) -> str:
    med = {v: statistics.median(w) for v, w in walls.items()}
    ratio = paired(walls, "hand", "paralab")
    steady, half, stalled = interval(pairs)
    cost, cost_half = sampling_cost(pairs)
    return (
        f"{strategy:<8} {size_name:<8} {steps:>5}  {med['paralab']:>9.3f} {med['hand']:>8.3f}"
        f"  {ratio:>12.3f} {f'{steady:.3f}±{half:.3f}':>12}"
        f" {'>= ' + format(size.target, '.2f'):>7} {verdict(steady, half, size.target):<6}"
        f" {f'{100 * cost:+.1f}±{100 * cost_half:.1f}%':>13}"
        f" {verdict(cost, cost_half, SAMPLING_TARGET, at_most=True):<6} {f'{stalled}/{len(pairs)}':>9}"
    )


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make bench ARGS=...", description=__doc__.split("\n")[0])
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats per case (median taken)")
    p.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply each size's step count (e.g. 0.05 to smoke-test)",
    )
    p.add_argument(
        "--parts",
        nargs="+",
        choices=("loop", "compile"),
        default=["loop", "compile"],
        help="loop: paralab against hand-written loops; compile: train.compile against eager",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every case, e.g. train.lr=0.05")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps_scale <= 0:
        p.error("--repeats must be >= 1 and --steps-scale > 0")
    return args


# ---- compiled against eager ----

# The GPT decoder, big enough that a step is compute (~0.1 s here), on the strategies torch compiles
# per block most often: DDP and FSDP.
COMPILE_CASE = (
    "model=transformer",
    "dataset=tokens",
    "model.hidden=256",
    "model.layers=4",
    "model.heads=4",
    "dataset.seq_len=128",
    "train.global_batch_size=16",
    "train.steps=30",
    "train.log_every=10",
)
COMPILE_STRATEGIES = ("ddp", "fsdp")


def compile_rows(args: argparse.Namespace, root: Path, log) -> None:
    """Per strategy: paralab's steady step time eager and compiled, their ratio (the median of
    each repeat's, the two run back to back), and the first step's extra time, the compile."""
    if dist.get_rank() == 0:
        print(
            "\ncompiled against eager (train.compile; GPT 256 wide, 4 blocks, seq 128, batch 16): "
            "median steady step time, eager/compiled = speed-up (median of paired repeats), "
            "compile s = the first compiled run's first step less a steady one (later runs in this "
            "process reuse torch's compiled code)",
            flush=True,
        )
        print(
            f"{'strategy':<8} {'eager s':>9} {'compiled s':>10} {'eager/compiled':>14} {'compile s':>9}",
            flush=True,
        )
    for strategy in COMPILE_STRATEGIES:
        times: dict[bool, list[float]] = {False: [], True: []}
        compile_s: list[float] = []
        for r in range(args.repeats):
            for compiled in (r % 2 == 1, r % 2 == 0):
                extra = [*COMPILE_CASE, f"strategy={strategy}", f"train.compile={str(compiled).lower()}"]
                cfg = typed_config(compose_config([*extra, *args.overrides]))
                world = dist.get_world_size()
                cfg = dataclasses.replace(
                    cfg, launcher=dataclasses.replace(cfg.launcher, nproc_per_node=world)
                )
                validate(cfg, world)
                job = root / f"compile-{strategy}-{compiled}-{r}"
                gc.collect()
                paralab_loop(cfg, job, log)
                if dist.get_rank() == 0:
                    record = RunRecord.read(job)
                    times[compiled].append(record.step_time_s)
                    if compiled and record.compile_s is not None:
                        compile_s.append(record.compile_s)
        if dist.get_rank() == 0:
            ratio = statistics.median(e / c for e, c in zip(times[False], times[True], strict=True))
            print(
                f"{strategy:<8} {statistics.median(times[False]):>9.4f} {statistics.median(times[True]):>10.4f} "
                f"{ratio:>14.2f} {compile_s[0]:>9.1f}",
                flush=True,
            )


def main(argv: list[str]) -> int:
    args = parse(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    env = rank_env()
    mesh = init_device_mesh(DEVICE.type, (world,))
    box = [tempfile.mkdtemp(prefix="paralab-bench-") if rank == 0 else None]
    dist.broadcast_object_list(box, 0)
    root = Path(box[0])  # type: ignore[arg-type]
    log = setup_rank_logging(root, rank)
    log.setLevel("ERROR")  # paralab's per-run info and warnings would bury the table

    first = True
    for size_name in args.sizes if "loop" in args.parts else ():
        size = SIZES[size_name]
        steps = max(3, round(size.steps * args.steps_scale))
        for strategy in args.strategies:
            shipped = case_config(strategy, size, steps, args.overrides)
            if first:
                set_threads(shipped, env)
                if rank == 0:
                    meaningful, note = timing_check(env, DEVICE)
                    print(
                        f"world={world} threads/rank={torch.get_num_threads()} repeats={args.repeats}: "
                        "median loop wall times (setup excluded)\n"
                        "hand/paralab = paralab's throughput relative to hand-written, the median of each "
                        "repeat's ratio; steady = the same per step, built once, in alternating chunks: total over "
                        "total, with its 95% interval (see interval); met/missed/unsure = that interval against the "
                        "target (shown, never enforced); sampling = the share of paralab's steady time its sampled "
                        "steps add (every 50th: comm counter, memory probes), with its 95% interval, against < 2%; "
                        f"stalled = steady pairs left out, a chunk over {STALLED:g}x its loop's median"
                    )
                    if not meaningful:
                        print(f"warning: {note}")
                    print(HEADER, flush=True)
                first = False
            runs: dict[str, Callable[[Path], float]] = {
                "paralab": lambda job, c=shipped: paralab_loop(c, job, log),
                "hand": lambda job, c=shipped, s=strategy: STRATEGIES[s](c, mesh).timed(),
            }
            walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(args.repeats):
                # Interleaved, and each repeat starts at a different variant: drift in machine load
                # and position in the sequence hit both alike.
                first_v = r % len(VARIANTS)
                for v in VARIANTS[first_v:] + VARIANTS[:first_v]:
                    # What the previous variant left in reference cycles (its model, optimizer,
                    # meter) is freed now, not by a collection in the middle of the next one.
                    gc.collect()
                    walls[v].append(rank0(runs[v](root / f"{strategy}-{size_name}-{v}-{r}")))
            gc.collect()
            steady = steady_pairs(
                shipped,
                mesh,
                root / f"{strategy}-{size_name}-steady",
                log,
                size.pairs * args.repeats,
                size.chunk,
            )
            if rank == 0:
                print(row(strategy, size_name, size, steps, walls, steady), flush=True)
    if "compile" in args.parts:
        compile_rows(args, root, log)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
