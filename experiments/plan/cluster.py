"""A cluster as the time model sees it: how long a matmul, an op, a memory sweep and a collective
take on it. From `make calibrate`'s measurements where the cluster's file has them, else from its
published peaks times an efficiency (conf/cluster/*.yaml)."""

from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from experiments.config.ranges import finite_number
from experiments.config.schema import ClusterConfig, ClusterDevice, ConfigError

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30
# What a process holds before its model: a CPU rank's interpreter, torch and gloo (measured ~0.45
# GiB RSS from the fork server, part of it shared), a GPU's CUDA context, NCCL's buffers and the
# caching allocator's slack.
PROCESS_BYTES = {"cpu": GiB // 4, "cuda": 2 * GiB}


def cores() -> int:
    """As parallel/distenv.py's set_threads counts them to split among local ranks."""
    return os.cpu_count() or 1


@dataclass
class Calibration:
    """What `make calibrate` measured (experiments/report/calibrate.py writes it)."""

    # dtype -> threads per rank (CPU; "0" on a GPU) -> [(m, k, n, seconds)]: one matmul's time by
    # shape, less the cost of dispatching it (paid once per op, as op_overhead_us).
    matmul: dict[str, dict[str, list[tuple[float, float, float, float]]]] = field(default_factory=dict)
    # dtype -> threads -> [(batch·heads, sequence, head dim, forward s, backward s)] of causal
    # fused attention (scaled_dot_product_attention).
    attention: dict[str, dict[str, list[tuple[float, ...]]]] = field(default_factory=dict)
    op_overhead_us: dict[str, float] = field(default_factory=dict)
    # threads -> [(bytes written, seconds)] of an elementwise op, less its dispatch, by size.
    elementwise: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    # threads -> µs the host spends on: a view op; one parameter tensor's optimizer step (by kind:
    # sgd, sgd_momentum, adamw); FSDP2 per parameter group and micro-step (hooks, copy-in/out);
    # DDP per parameter (its autograd hook); one tensor-parallel linear (DTensor dispatch).
    host_us: dict[str, dict[str, float]] = field(default_factory=dict)
    # collective -> group size -> (α µs per call, GB/s of the bytes one rank sends)
    collectives: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            raw = json.loads(path.read_text())
            cal = cls._of(raw, path)
            cal._check()
            return cal
        # What a file can hold that is not a calibration: bad JSON or UTF-8, the wrong shapes or
        # types, numbers too large for a float, nesting too deep to parse.
        except (ValueError, KeyError, TypeError, AttributeError, OSError, OverflowError, RecursionError) as e:
            raise ConfigError(
                f"{path} is not a calibration this paralab reads ({type(e).__name__}: {str(e)[:160]}); "
                "run make calibrate again"
            ) from None

    def _check(self) -> None:
        """What make calibrate writes: the tables every plan prices with non-empty (host_us may be
        empty: a GPU's kernels hide the host, so calibrate measures it on CPUs only), keyed by
        thread counts (0 on a GPU), every point whole and its numbers finite: sizes and
        bandwidths > 0, times >= 0 (the lookups take logs of sizes and divide by bandwidths)."""

        def threads(where: str, table: dict, required: bool = True) -> None:
            if required and not table:
                raise ValueError(f"{where} is empty")
            for k in table:
                if not str(k).isascii() or not str(k).isdigit():
                    raise ValueError(f"{where} has key {k!r}: expected a thread count")

        def points(where: str, rows: list, width: int, sizes: int) -> None:
            if not rows:
                raise ValueError(f"{where} has no measurements")
            for row in rows:
                if len(row) != width or not all(finite_number(v) for v in row):
                    raise ValueError(f"{where} holds {row!r}: expected {width} finite numbers")
                if any(v <= 0 for v in row[:sizes]) or any(v < 0 for v in row[sizes:]):
                    raise ValueError(f"{where} holds {row!r}: sizes must be > 0 and times >= 0")

        if not self.matmul:
            raise ValueError("matmul is empty")
        for name, by_dtype in (("matmul", self.matmul), ("attention", self.attention)):
            for dtype, by_threads in by_dtype.items():
                threads(f"{name}.{dtype}", by_threads)
                for n, rows in by_threads.items():
                    points(f"{name}.{dtype}.{n}", rows, 4 if name == "matmul" else 5, 3)
        threads("elementwise", self.elementwise)
        threads("op_overhead_us", self.op_overhead_us)
        threads("host_us", self.host_us, required=False)
        for n, rows in self.elementwise.items():
            points(f"elementwise.{n}", rows, 2, 1)
        for coll, by_n in self.collectives.items():
            for n, ab in by_n.items():
                points(f"collectives.{coll}.{int(n)}", [ab], 2, 0)
                if ab[1] <= 0:
                    raise ValueError(f"collectives.{coll}.{n} holds {ab!r}: (α µs >= 0, GB/s > 0)")
        costs = [*self.op_overhead_us.values(), *(v for h in self.host_us.values() for v in h.values())]
        if not all(finite_number(v) and v >= 0 for v in costs):
            raise ValueError("op_overhead_us and host_us must be finite numbers >= 0")

    @classmethod
    def _of(cls, raw: dict, path: Path) -> Calibration:
        return cls(
            matmul={
                dtype: {k: sorted(tuple(p) for p in v) for k, v in by_threads.items()}
                for dtype, by_threads in raw["matmul"].items()
            },
            attention=raw["attention"],
            op_overhead_us=raw["op_overhead_us"],
            elementwise={k: sorted(tuple(p) for p in v) for k, v in raw["elementwise"].items()},
            host_us=raw["host_us"],
            collectives={
                c: {n: tuple(ab) for n, ab in by_n.items()} for c, by_n in raw["collectives"].items()
            },
            source=str(path),
        )


def _nearest(table: dict[str, object], threads: int) -> str:
    return min(table, key=lambda k: (abs(int(k) - threads), -int(k)))


def _nearest_shape(table: list[tuple[float, ...]], dims: tuple[float, ...]) -> tuple[float, ...]:
    """The measured point whose leading dims lie nearest `dims` in log space."""
    logs = [math.log(x) for x in dims]
    return min(
        table, key=lambda p: sum((math.log(a) - b) ** 2 for a, b in zip(p[: len(logs)], logs, strict=True))
    )


def _interp_loglog(points: list[tuple[float, float]], x: float) -> float:
    """Seconds at size x, between the two measured sizes around it (log-log); beyond the largest,
    at its rate; below the smallest, at its time scaled by size."""
    xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, x)
    if i >= len(points):
        f, s = points[-1]
        return s * x / f
    if i == 0:
        f, s = points[0]
        return s * x / f
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))


@dataclass
class Machine:
    """A cluster's devices and links, ready to price work on them."""

    cfg: ClusterConfig
    calibration: Calibration | None

    @property
    def devices_per_node(self) -> int:
        return self.cfg.devices_per_node or cores()

    @property
    def devices(self) -> int:
        return self.cfg.nodes * self.devices_per_node

    @property
    def cpu(self) -> bool:
        return self.cfg.device == ClusterDevice.cpu

    def threads(self, ranks_per_node: int) -> int:
        """Intra-op threads per rank: CPU ranks share the node's cores (launcher.threads_per_rank=0)."""
        return max(1, self.devices_per_node // ranks_per_node) if self.cpu else 0

    def memory_per_rank(self, ranks_per_node: int) -> float:
        total = self.cfg.memory_gib * GiB
        return total / ranks_per_node if self.cpu else total

    def peak_flops(self, dtype: str) -> float:
        c = self.cfg
        return {"bf16": c.peak_tflops_bf16, "tf32": c.peak_tflops_tf32, "fp32": c.peak_tflops_fp32}.get(
            dtype, 0.0
        ) * 1e12

    def matmul_s(
        self, mkn: tuple[float, float, float], threads: int, dtype: str, efficiency: float | None = None
    ) -> float:
        """One (m × k) @ (k × n) matmul: the calibrated shape nearest in log space, scaled by FLOPs."""
        m, k, n = mkn
        flops = 2 * m * k * n
        if flops <= 0:
            return 0.0
        cal = self.calibration
        if cal is not None and dtype in cal.matmul:
            table = cal.matmul[dtype][_nearest(cal.matmul[dtype], threads)]
            near = _nearest_shape(table, (m, k, n))
            return near[3] * flops / (2 * near[0] * near[1] * near[2])
        # Efficiency grows with size: half of matmul_efficiency at half_efficiency_gflop.
        peak = self.peak_flops(dtype) or self.peak_flops("fp32")
        half = self.cfg.half_efficiency_gflop * 1e9
        eff = self.cfg.matmul_efficiency if efficiency is None else efficiency
        rate = peak * eff * flops / (flops + half)
        if self.cpu:
            rate *= threads / self.devices_per_node  # the peak is the node's, shared by its ranks
        return flops / rate

    def attention_s(
        self, bh: float, s: float, d: float, backward: bool, threads: int, dtype: str
    ) -> float | None:
        """Causal fused attention over bh batch·heads of s tokens of head dim d: the calibrated
        shape nearest in log space, scaled by bh·s²·d; None where not calibrated."""
        cal = self.calibration
        if cal is None or dtype not in cal.attention:
            return None
        table = cal.attention[dtype][_nearest(cal.attention[dtype], threads)]
        near = _nearest_shape(table, (bh, s, d))
        work = bh * s * s * d / (near[0] * near[1] * near[1] * near[2])
        return (near[4] if backward else near[3]) * work

    def op_s(self, threads: int) -> float:
        cal = self.calibration
        if cal is not None and cal.op_overhead_us:
            return cal.op_overhead_us[_nearest(cal.op_overhead_us, threads)] * 1e-6
        return self.cfg.op_overhead_us * 1e-6

    def host_s(self, what: str, threads: int) -> float:
        """Host seconds of one framework step `what` (Calibration.host_us); 0 uncalibrated, where
        a GPU's kernels hide the host (a CPU cluster: calibrate it)."""
        cal = self.calibration
        if cal is None or not cal.host_us:
            return 0.0
        return cal.host_us[_nearest(cal.host_us, threads)].get(what, 0.0) * 1e-6

    def memory_s(self, nbytes: float, threads: int) -> float:
        """An elementwise op that writes `nbytes`, its dispatch aside."""
        if nbytes <= 0:
            return 0.0
        cal = self.calibration
        if cal is not None and cal.elementwise:
            return _interp_loglog(cal.elementwise[_nearest(cal.elementwise, threads)], nbytes)
        rate = self.cfg.mem_gb_per_s * 1e9 * (threads / self.devices_per_node if self.cpu else 1)
        return 3 * nbytes / rate  # read two inputs, write one output

    def collective_s(
        self, collective: str, n: int, calls: float, wire_bytes: float, across_nodes: bool
    ) -> float:
        """Seconds for `calls` calls of a collective over n ranks that send `wire_bytes` in all."""
        if n <= 1 or calls <= 0:
            return 0.0
        coll = "send" if collective in ("send", "recv") else collective
        cal = self.calibration
        if cal is not None and coll in cal.collectives and not across_nodes:
            by_n = cal.collectives[coll]
            alpha_us, gbps = by_n[_nearest(by_n, n)]
            if collective == "recv":
                return calls * alpha_us * 1e-6  # its bytes are the peer's send
            return calls * alpha_us * 1e-6 + wire_bytes / (gbps * 1e9)
        link = self.cfg.inter if across_nodes else self.cfg.intra
        # A ring pays the link's latency at each of its steps: n − 1 per phase, two phases to reduce.
        steps = {"all_reduce": 2 * (n - 1), "all_gather": n - 1, "reduce_scatter": n - 1, "all_to_all": n - 1}
        alpha = calls * steps.get(collective, 1) * link.alpha_us * 1e-6
        if collective == "recv":
            return alpha
        return alpha + wire_bytes / (link.gb_per_s * 1e9)

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def describe(self) -> str:
        c = self.cfg
        what = f"{c.nodes} × {self.devices_per_node} {'cores' if self.cpu else 'GPUs'}"
        source = (
            f"calibrated ({self.calibration.source})"
            if self.calibration
            else "uncalibrated (published peaks × efficiency)"
        )
        return f"cluster={c.name}: {what}, {c.memory_gib:g} GiB {'per node' if self.cpu else 'per GPU'}; {source}"


def machine(cfg: ClusterConfig, calibrated: bool = True) -> Machine:
    """The cluster, checked: one line where it cannot hold a rank."""
    if (
        cfg.nodes < 1
        or cfg.devices_per_node < 0
        or (cfg.device == ClusterDevice.cuda and cfg.devices_per_node < 1)
    ):
        raise ConfigError(
            f"cluster={cfg.name} has no devices (cluster.nodes={cfg.nodes}, cluster.devices_per_node="
            f"{cfg.devices_per_node}); give it at least one node of at least one device"
        )
    if cfg.memory_gib <= 0:
        raise ConfigError(
            f"cluster.memory_gib={cfg.memory_gib:g} must be > 0 (GiB per device; CPU: per node)"
        )
    path = ROOT / cfg.calibration if cfg.calibration else None
    if path is not None and path.exists() and not path.is_file():
        raise ConfigError(
            f"cluster.calibration={cfg.calibration} is not a file; give the JSON make calibrate writes "
            "(a path that does not exist yet: uncalibrated until make calibrate writes it)"
        )
    cal = Calibration.load(path) if calibrated and path is not None and path.is_file() else None
    return Machine(cfg, cal)
