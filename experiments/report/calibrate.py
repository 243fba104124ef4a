"""`make calibrate`: measure this machine for the advisor, into the file its cluster config names.

- matmul throughput by size (torch.mm; fp32 on CPU at each thread count a rank may get, the
  cluster's dtypes on a GPU);
- the cost of one op inside a training step (a deep, tiny model's forward and backward, divided
  by its aten ops: dispatch, autograd and nn.Module overhead together);
- memory bandwidth (bytes an elementwise op writes per second);
- each collective's α (seconds per call) and β (seconds per byte a rank sends, ring model) per
  group size, on ranks started by torch's own launcher (gloo on CPU, NCCL on GPU).

    python -m experiments.report.calibrate [cluster=<name>] [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from experiments.config.compose_errors import COMPOSE_ERRORS, compose_error_line
from experiments.config.schema import ConfigError
from experiments.plan.cluster import ROOT, cores
from experiments.plan.profile import count_ops
from experiments.report.plan import load

# torch 2.14 renamed the flat-tensor collectives (the old names warn); the same ops underneath.
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "all_to_all")


def _timed(fn: Callable[[], object], sync: Callable[[], None], budget_s: float, least: int = 3) -> float:
    """Median seconds of one call, over calls filling ~budget_s (at least `least`), after a warm-up.
    budget_s = 0: exactly `least` calls (ranks of a collective must all make the same calls)."""
    fn()
    sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < least or (budget_s and spent < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if len(times) >= 200:
            break
    return statistics.median(times)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _floor(device: torch.device, op: Callable[[], object]) -> float:
    """What dispatching one op costs, its work aside: the same op on a tensor of one element."""
    return _timed(op, _sync(device), 0.05)


def matmul_table(
    device: torch.device, dtype: torch.dtype, quick: bool
) -> list[tuple[float, float, float, float]]:
    """(m, k, n, seconds) over a grid of shapes, less the dispatch (op_overhead_us pays it)."""
    dims = (16, 256, 4096) if quick else (16, 64, 256, 1024, 4096)
    ms = dims + (() if quick else (16384,))
    if device.type == "cuda":
        dims, ms = tuple(d * 4 for d in dims), tuple(m * 4 for m in ms)
    one = torch.ones(1, 1, device=device, dtype=dtype)
    floor = _floor(device, lambda: one @ one)
    out = []
    for m in ms:
        for k in dims:
            for n in dims:
                if m * k * n > (2**31 if device.type == "cpu" else 2**38):
                    continue  # seconds each on a CPU core; its rate is the largest's below
                a = torch.randn(m, k, device=device, dtype=dtype)
                b = torch.randn(k, n, device=device, dtype=dtype)
                secs = _timed(lambda a=a, b=b: a @ b, _sync(device), 0.01 if quick else 0.04)
                out.append((float(m), float(k), float(n), max(secs - floor, 0.1 * secs)))
    return out


def attention_table(device: torch.device, dtype: torch.dtype, quick: bool) -> list[tuple[float, ...]]:
    """(batch·heads, sequence, head dim, forward s, backward s) of causal fused attention, by shape:
    its kernels run far from matmul rates at small head dims, so it is measured, not derived."""
    import torch.nn.functional as F

    out = []
    for bh in (8, 64) if quick else (4, 16, 64, 256):
        for s in (64, 512) if quick else (32, 128, 512, 2048):
            for d in (16, 64) if quick else (8, 32, 64, 128):
                if bh * s * s * d > 2**31:
                    continue
                q = torch.randn(1, bh, s, d, device=device, dtype=dtype, requires_grad=True)
                fwd = _timed(
                    lambda q=q: F.scaled_dot_product_attention(q, q, q, is_causal=True),
                    _sync(device),
                    0.02 if quick else 0.05,
                )
                o = F.scaled_dot_product_attention(q, q, q, is_causal=True)
                grad = torch.ones_like(o)
                both = _timed(
                    lambda q=q, g=grad: F.scaled_dot_product_attention(q, q, q, is_causal=True).backward(g),
                    _sync(device),
                    0.02 if quick else 0.05,
                )
                out.append((float(bh), float(s), float(d), fwd, max(both - fwd, fwd)))
    return out


def op_overhead_us(device: torch.device, quick: bool) -> float:
    """Seconds per aten op of a training step whose ops do almost nothing."""
    layers = [
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.GELU()) for _ in range(16)
    ]
    model = torch.nn.Sequential(*layers).to(device)
    x = torch.randn(2, 8, device=device)

    def step() -> None:
        model(x).sum().backward()

    ops = count_ops(step)
    return 1e6 * _timed(step, _sync(device), 0.1 if quick else 0.5) / ops


def elementwise_table(device: torch.device, quick: bool) -> list[tuple[float, float]]:
    """(bytes written, seconds) of an out-of-place add, less its dispatch, from 4 KiB to 256 MiB."""
    one = torch.ones(1, device=device)
    floor = _floor(device, lambda: one + one)
    out = []
    for p in range(10, 27, 4 if quick else 2):
        a, b = torch.randn(2**p, device=device), torch.randn(2**p, device=device)
        secs = _timed(lambda a=a, b=b: a + b, _sync(device), 0.02 if quick else 0.1)
        out.append((4.0 * 2**p, max(secs - floor, 0.1 * secs)))
    return out


def host_us(quick: bool) -> dict[str, float]:
    """The host's share of what the time model prices per view, per optimizer tensor, and of each
    strategy's wrapping (FSDP2 per group, DDP per parameter, DTensor per TP linear): each the
    difference a tiny model's step shows with and without it, in a process group of one."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    budget = 0.1 if quick else 0.4
    out: dict[str, float] = {}
    t = torch.ones(4, 4)
    out["view"] = 1e6 * _timed(lambda: [t.view(16) for _ in range(100)], lambda: None, budget) / 100
    optimizers = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
        "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1),
    }

    def optimizer_us(make, wrap) -> float:
        params = [torch.nn.Parameter(wrap(torch.ones(8, 8))) for _ in range(64)]
        for p in params:
            p.grad = wrap(torch.ones(8, 8))
        return 1e6 * _timed(make(params).step, lambda: None, budget) / 64

    for kind, make in optimizers.items():
        out[kind] = optimizer_us(make, lambda t: t)

    def blocks() -> torch.nn.Sequential:
        return torch.nn.Sequential(
            *[
                torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
                for _ in range(16)
            ]
        )

    x = torch.ones(4, 16)

    def step_s(model: torch.nn.Module) -> float:
        return _timed(lambda: model(x).sum().backward(), lambda: None, budget)

    plain = blocks()
    base = step_s(plain)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        # FSDP2's and TP's parameters are DTensors: each optimizer op dispatches through DTensor.
        for kind, make in optimizers.items():
            out[f"{kind}_dtensor"] = optimizer_us(make, lambda t: distribute_tensor(t, mesh, [Shard(0)]))
        sharded = copy.deepcopy(plain)
        for block in sharded:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        out["fsdp_group"] = 1e6 * max(step_s(sharded) - base, 0.0) / 17
        ddp = DistributedDataParallel(copy.deepcopy(plain))
        out["ddp_param"] = 1e6 * max(step_s(ddp) - base, 0.0) / sum(1 for _ in plain.parameters())
        tp = copy.deepcopy(plain)
        for block in tp:
            parallelize_module(block, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        out["tp_linear"] = 1e6 * max(step_s(tp) - base, 0.0) / (3 * 32)
    finally:
        dist.destroy_process_group()
    return out


def measure_device(device: torch.device, quick: bool) -> dict:
    """Everything but the collectives, at each thread count a rank of this node may run with."""
    if device.type == "cuda":
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        counts = [0]
    else:
        dtypes = {"fp32": torch.float32}
        n = cores()
        counts = sorted({max(1, n // r) for r in range(1, n + 1)})
    out: dict = {
        "matmul": {d: {} for d in dtypes},
        "attention": {d: {} for d in dtypes},
        "op_overhead_us": {},
        "elementwise": {},
        "host_us": {},
    }
    for threads in counts:
        if threads:
            torch.set_num_threads(threads)
        key = str(threads)
        for name, dtype in dtypes.items():
            out["matmul"][name][key] = matmul_table(device, dtype, quick)
            out["attention"][name][key] = attention_table(device, dtype, quick)
        out["op_overhead_us"][key] = op_overhead_us(device, quick)
        out["elementwise"][key] = elementwise_table(device, quick)
        if device.type == "cpu":  # on a GPU the kernels' time hides the host's
            out["host_us"][key] = host_us(quick)
    return out


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares t = α + β·bytes; (α in µs, 1/β in GB/s)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    beta = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    beta = max(beta, 1e-15)
    alpha = max(my - beta * mx, 0.0)
    return alpha * 1e6, 1 / beta / 1e9


def collectives_worker(out: Path, quick: bool) -> None:
    """One rank of the collective sweep (under torch.distributed.run)."""
    from experiments.measure.theory import ring_bytes

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, cores() // int(os.environ["LOCAL_WORLD_SIZE"])))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    sizes = [2**k for k in range(12, 23, 2 if quick else 1)] if not cuda else [2**k for k in range(16, 31, 2)]
    # In a step, a collective follows compute, not another collective: gloo's threads have gone
    # idle and the ranks arrive apart. Each call here follows the same small matmul, whose own
    # time is taken off again.
    a = torch.randn(256, 256, device=device)
    work = (lambda: a @ a) if not cuda else (lambda: None)
    work_s = _timed(work, lambda: None, 0, least=30)
    result: dict[str, tuple[float, float]] = {}
    for coll in COLLECTIVES:
        points = []
        for size in sizes:
            elems = size // 4
            x = torch.ones(elems, device=device)
            gathered = torch.empty(elems * n, device=device)
            shard = torch.empty(max(1, elems // n), device=device)
            calls: dict[str, Callable[[], object]] = {
                "all_reduce": lambda x=x: dist.all_reduce(x),
                "all_gather": lambda x=x, g=gathered: ALL_GATHER(g, x),
                "reduce_scatter": lambda s=shard, x=x: REDUCE_SCATTER(s, x[: s.numel() * n]),
                "broadcast": lambda x=x: dist.broadcast(x, 0),
                "send": lambda x=x: dist.send(x, 1) if rank == 0 else dist.recv(x, 0) if rank == 1 else None,
                "all_to_all": lambda x=x: dist.all_to_all_single(
                    torch.empty_like(x[: x.numel() // n * n]), x[: x.numel() // n * n]
                ),
            }

            def once(call=calls[coll]) -> None:
                work()
                call()
                if cuda:
                    torch.cuda.synchronize()

            dist.barrier()
            secs = torch.tensor(max(_timed(once, lambda: None, 0, least=5 if quick else 15) - work_s, 1e-7))
            dist.all_reduce(secs, op=dist.ReduceOp.MAX)  # the slowest rank is what a step waits for
            points.append((ring_bytes(coll, size, n), secs.item()))
        result[coll] = _fit(points)
    if rank == 0:
        out.write_text(json.dumps({str(n): result}))
    dist.destroy_process_group()


def measure_collectives(quick: bool, gpus: int) -> dict:
    """α-β per collective at each group size of this node (2, 4, … up to its cores or GPUs)."""
    most = gpus or cores()
    sizes = [2**i for i in range(1, most.bit_length()) if 2**i <= most]
    merged: dict[str, dict[str, tuple[float, float]]] = {c: {} for c in COLLECTIVES}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="paralab-calibrate-") as tmp:
            out = Path(tmp) / "out.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            cmd += ["-m", "experiments.report.calibrate", "--collectives", str(out)] + (
                ["--quick"] if quick else []
            )
            subprocess.run(cmd, check=True, cwd=ROOT)
            for size, by_coll in json.loads(out.read_text()).items():
                for coll, ab in by_coll.items():
                    merged[coll][size] = tuple(ab)
    return merged


def main(argv: list[str]) -> int:
    if argv[:1] == ["--collectives"]:
        collectives_worker(Path(argv[1]), "--quick" in argv)
        return 0
    quick = "--quick" in argv
    overrides = [a for a in argv if a != "--quick"]
    try:
        # Every key and number of the cluster, before a minute of measuring; what is on file is
        # about to be replaced, so it is not read.
        cfg, m = load(overrides, calibrated=False)
        cluster = cfg.cluster
    except ConfigError as e:
        print(f"paralab: {e}", file=sys.stderr)
        return 2
    except COMPOSE_ERRORS as e:
        print(f"paralab: config error: {compose_error_line(e)}", file=sys.stderr)
        return 2
    if not cluster.calibration:
        print(
            f"paralab: cluster={cluster.name} names no calibration file (cluster.calibration)",
            file=sys.stderr,
        )
        return 2
    cuda = torch.cuda.is_available()
    if m.cpu == cuda:
        have = f"{torch.cuda.device_count()} GPUs" if cuda else "no GPU"
        print(
            f"paralab: cluster={cluster.name} is {cluster.device} and this machine has {have}: calibrate it on its own machine",
            file=sys.stderr,
        )
        return 2
    path = ROOT / cluster.calibration
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
    except OSError:
        writable = False
    if not writable:
        print(
            f"paralab: cluster.calibration={cluster.calibration} cannot be written here; give a path you can write",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    raw = measure_device(device, quick)
    raw["collectives"] = measure_collectives(quick, torch.cuda.device_count() if cuda else 0)
    raw["measured"] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else f"{cores()} CPU cores",
        "quick": quick,
    }
    # Whole or not at all: a run stopped while writing leaves the calibration on file as it was.
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(raw, indent=1))
    os.replace(part, path)
    summary = ", ".join(
        f"{t} thread{'s' * (t != '1')}: matmul {max(2 * m * k * n / s for m, k, n, s in pts) / 1e9:.1f} GFLOP/s best, "
        f"op {raw['op_overhead_us'][t]:.1f} µs, add {max(b / s for b, s in raw['elementwise'][t]) / 1e9:.1f} GB/s written best"
        for t, pts in raw["matmul"]["fp32"].items()
    )
    print(f"calibrated cluster={cluster.name} in {time.perf_counter() - t0:.0f} s: {summary}")
    for t, host in raw["host_us"].items():
        print(f"  host µs, {t} thread(s): " + ", ".join(f"{k} {v:.1f}" for k, v in host.items()))
    for coll, by_n in raw["collectives"].items():
        print(f"  {coll:<15}" + "  ".join(f"n={n}: α {a:.0f} µs, {g:.2f} GB/s" for n, (a, g) in by_n.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
