"""Turn a sweep into a report: `python -m experiments.compare <sweep dir>` (or `make compare`).

Reads every job's metrics.json and rank 0's TensorBoard events, then writes into the sweep dir
report.md, report.csv and PNG plots, and prints the table.
"""

from __future__ import annotations

import csv
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.metrics import METRICS_FILE, read_metrics, tb_dir  # noqa: E402

MiB = 2**20


@dataclass
class Job:
    name: str
    dir: Path
    m: dict[str, Any]
    loss_curve: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        extra = f" {self.m['schedule']} m={self.m['microbatches']}" if self.m.get("schedule") else ""
        return f"{self.m['strategy']}{extra} ws={self.m['world_size']}"

    def rank_mean(self, key: str) -> float | None:
        values = [r[key] for r in self.m.get("ranks", []) if r and key in r]
        return statistics.mean(values) if values else None

    def rank_max(self, key: str) -> float | None:
        values = [r[key] for r in self.m.get("ranks", []) if r and key in r]
        return max(values) if values else None

    def theory(self, key: str) -> float | None:
        return self.m.get("theory", {}).get(key)

    def measured_wire(self) -> float | None:
        return self.rank_mean("comm/total_wire_bytes")

    def theory_wire(self) -> float | None:
        keys = [
            k for k in self.m.get("theory", {}) if k.startswith("theory/comm/") and k.endswith("_wire_bytes")
        ]
        return sum(self.m["theory"][k] for k in keys) if keys else None


def tb_losses(job_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir(job_dir, 0)), size_guidance={"scalars": 0})
    acc.Reload()
    if "loss/train" not in acc.Tags()["scalars"]:
        return []
    return [e.value for e in sorted(acc.Scalars("loss/train"), key=lambda e: e.step)]


def load_jobs(sweep: Path) -> list[Job]:
    jobs = []
    for metrics in sorted(sweep.rglob(METRICS_FILE)):
        d = metrics.parent
        jobs.append(Job(str(d.relative_to(sweep)) or d.name, d, read_metrics(d), tb_losses(d)))
    return jobs


def _reference(job: Job, jobs: list[Job]) -> Job | None:
    """The single-process run of the same experiment, when the sweep has one."""
    same = [
        j
        for j in jobs
        if j.m["world_size"] == 1
        and all(j.m[k] == job.m[k] for k in ("model", "dataset", "global_batch_size", "steps", "optimizer"))
    ]
    same.sort(key=lambda j: j.m["strategy"] != "single")
    return same[0] if same else None


def _max_dev(a: list[float], b: list[float]) -> float | None:
    if not a or len(a) != len(b):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def _pct(measured: float | None, predicted: float | None) -> str:
    if measured is None or not predicted:
        return ""
    return f"{100 * (measured - predicted) / predicted:+.1f}%"


def _fmt(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "" if x is None else f"{x / scale:.{digits}f}"


def rows(jobs: list[Job]) -> list[dict[str, str]]:
    base = {}
    for j in jobs:
        if j.m["world_size"] == 1:
            base.setdefault(j.m["strategy"], j.m["samples_per_s"])
    single = next((j.m["samples_per_s"] for j in jobs if j.m["strategy"] == "single"), None)
    out = []
    for j in sorted(jobs, key=lambda j: (j.m["strategy"], j.m["world_size"], j.name)):
        ws, thr = j.m["world_size"], j.m["samples_per_s"]
        ref_thr = base.get(j.m["strategy"], single)
        ref = _reference(j, jobs)
        mem, mem_t = j.rank_max("mem/model_state_bytes"), j.theory("theory/mem/model_state_bytes")
        wire, wire_t = j.measured_wire(), j.theory_wire()
        bubble, bubble_t = (
            j.rank_mean("pipeline/bubble_fraction"),
            j.theory("theory/pipeline/bubble_fraction"),
        )
        dev = _max_dev(j.m["losses"], ref.m["losses"]) if ref and ref is not j else None
        out.append(
            {
                "job": j.name,
                "strategy": j.label,
                "world": str(ws),
                "samples/s": f"{thr:.1f}",
                "scaling eff": f"{thr / (ws * ref_thr):.2f}" if ref_thr else "",
                "state MiB (max rank)": _fmt(mem, MiB, 3),
                "theory MiB": _fmt(mem_t, MiB, 3),
                "mem Δ": _pct(mem, mem_t),
                "paper MiB": _fmt(j.theory("theory/mem/paper_model_state_bytes"), MiB, 3),
                "sent MiB/step": _fmt(wire, MiB, 3),
                "theory sent": _fmt(wire_t, MiB, 3),
                "comm Δ": _pct(wire, wire_t),
                "bubble": _fmt(bubble, 1, 3),
                "theory bubble": _fmt(bubble_t, 1, 3),
                "final loss": f"{j.m['final_loss']:.5f}",
                "max loss dev vs 1 proc": "" if dev is None else f"{dev:.1e}",
            }
        )
    return out


def table(rs: list[dict[str, str]]) -> str:
    cols = list(rs[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rs)) for c in cols}
    lines = [" | ".join(c.ljust(widths[c]) for c in cols), "-|-".join("-" * widths[c] for c in cols)]
    lines += [" | ".join(r[c].ljust(widths[c]) for c in cols) for r in rs]
    return "\n".join(lines)


def _by_strategy(jobs: list[Job]) -> dict[str, list[Job]]:
    groups: dict[str, list[Job]] = {}
    for j in sorted(jobs, key=lambda j: j.m["world_size"]):
        groups.setdefault(j.label.rsplit(" ws=", 1)[0], []).append(j)
    return groups


def plot_throughput(jobs: list[Job], path: Path) -> None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, js in _by_strategy(jobs).items():
        ws = [j.m["world_size"] for j in js]
        thr = [j.m["samples_per_s"] for j in js]
        ax.plot(ws, thr, marker="o", label=name)
        if ws[0] == 1:
            ax2.plot(ws, [t / (w * thr[0]) for t, w in zip(thr, ws, strict=True)], marker="o", label=name)
    ax.set(xlabel="world size", ylabel="samples/s (global)", title="Throughput")
    ax2.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax2.set(xlabel="world size", ylabel="throughput / (N × 1-rank throughput)", title="Scaling efficiency")
    for a in (ax, ax2):
        a.set_xticks(sorted({j.m["world_size"] for j in jobs}))
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(jobs: list[Job], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, js) in enumerate(_by_strategy(jobs).items()):
        color = f"C{i}"
        pts = [
            (j.m["world_size"], r["mem/model_state_bytes"] / MiB)
            for j in js
            for r in j.m["ranks"]
            if r and "mem/model_state_bytes" in r
        ]
        if not pts:
            continue
        ax.scatter(*zip(*pts, strict=True), color=color, label=f"{name} (each rank)", s=22)
        th = [(j.m["world_size"], j.theory("theory/mem/model_state_bytes")) for j in js]
        th = [(w, v / MiB) for w, v in th if v]
        if th:
            ax.plot(*zip(*th, strict=True), color=color, ls="--", lw=1, label=f"{name} theory")
    ax.set(
        xlabel="world size",
        ylabel="model-state MiB per rank",
        title="Per-rank memory: params + grads + optimizer state",
    )
    ax.set_xticks(sorted({j.m["world_size"] for j in jobs}))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comm(jobs: list[Job], path: Path) -> None:
    js = [j for j in jobs if j.measured_wire() is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(js) + 2), 4.5))
    xs = range(len(js))
    ax.bar([x - 0.2 for x in xs], [(j.measured_wire() or 0) / MiB for j in js], 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], [(j.theory_wire() or 0) / MiB for j in js], 0.4, label="theory (ring)")
    ax.set_xticks(list(xs), [j.label for j in js], rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="MiB sent per rank per step", title="Communication per step: measured vs predicted")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(jobs: list[Job], path: Path) -> None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for j in jobs:
        curve = j.loss_curve or j.m["losses"]
        ax.plot(range(1, len(curve) + 1), curve, label=j.label, lw=1)
    ax.set(xlabel="step", ylabel="loss (global mean)", title="Loss curves")
    ax.legend(fontsize=7)
    devs = [
        (j.label, _max_dev(j.m["losses"], r.m["losses"]))
        for j in jobs
        if (r := _reference(j, jobs)) and r is not j
    ]
    devs = [(n, d) for n, d in devs if d is not None]
    if devs:
        ax2.bar(range(len(devs)), [max(d, 1e-12) for _, d in devs])
        ax2.set_yscale("log")
        ax2.axhline(1e-5, color="red", lw=0.8, ls="--", label="fp32 tolerance 1e-5")
        ax2.set_xticks(range(len(devs)), [n for n, _ in devs], rotation=45, ha="right", fontsize=7)
        ax2.legend(fontsize=8)
    ax2.set(
        ylabel="max relative loss deviation", title="Deviation from the single-process run (exact = 1e-12)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bubble(jobs: list[Job], path: Path) -> bool:
    js = [j for j in jobs if j.rank_mean("pipeline/bubble_fraction") is not None]
    if not js:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, group) in enumerate(_by_strategy(js).items()):
        ax.scatter(
            [i], [group[0].rank_mean("pipeline/bubble_fraction")], color=f"C{i}", label=f"{name} measured"
        )
        t = group[0].theory("theory/pipeline/bubble_fraction")
        if t is not None:
            ax.scatter([i], [t], color=f"C{i}", marker="_", s=400, label=f"{name} theory")
    ax.set_xticks(range(len(_by_strategy(js))), list(_by_strategy(js)), rotation=30, ha="right", fontsize=8)
    ax.set(
        ylabel="bubble share of step time", title="Pipeline bubble: measured vs (p−1)/(v·m+p−1)", ylim=(0, 1)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


NOTES = """## Reading this report
- **scaling eff** = throughput at N ranks ÷ (N × the same strategy's 1-rank throughput). On a CPU
  machine with fewer cores than ranks it falls with N by construction; compare strategies, not absolutes.
- **state MiB** = params + params held gathered into backward + grads + optimizer state on the rank
  that holds most, measured from the local storages. **theory** is what torch's implementation must
  hold; **paper** is the ZeRO formula with this run's sizes. They differ only for FSDP2's ZeRO-2
  (it keeps each parameter's shard beside the gathered copy: +param bytes·Ψ/N; in the paper's mixed
  precision accounting that shard is the fp32 master copy inside K) and for ZeRO-1, where
  ZeroRedundancyOptimizer assigns whole parameters to ranks rather than Ψ/N each.
- **sent MiB/step** = ring-model bytes this rank sends for the collectives of one step (c10d ops
  counted by a dispatch mode: payload S → all-reduce 2(N−1)/N·S, all-gather and reduce-scatter
  (N−1)/N·S, broadcast and send S). Theory is given for DDP, ZeRO-1/2/3 and TP.
- **bubble** = 1 − (time in stage compute ÷ time in the pipeline step), averaged over ranks, beside
  GPipe's (p−1)/(v·m+p−1) share of total. Measured is higher on CPU: send/recv and the schedule's
  own bookkeeping count as idle, and oversubscribed ranks wait for a core. Each microbatch also pays
  a fixed cost, so with tiny models the measured bubble falls far less than theory as m grows.
  Zero-bubble schedules have no closed form here.
"""


def report(sweep: Path) -> str:
    jobs = load_jobs(sweep)
    if not jobs:
        raise SystemExit(
            f"paralab: no {METRICS_FILE} under {sweep}; run a sweep first (python train.py -m ...)"
        )
    rs = rows(jobs)
    with (sweep / "report.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rs[0]))
        w.writeheader()
        w.writerows(rs)
    plot_throughput(jobs, sweep / "throughput.png")
    plot_memory(jobs, sweep / "memory.png")
    plot_comm(jobs, sweep / "comm.png")
    plot_losses(jobs, sweep / "losses.png")
    pictures = ["throughput.png", "memory.png", "comm.png", "losses.png"]
    if plot_bubble(jobs, sweep / "bubble.png"):
        pictures.append("bubble.png")
    text = table(rs)
    md = [
        f"# paralab sweep report: {sweep.name}",
        "",
        f"{len(jobs)} jobs.",
        "",
        "```",
        text,
        "```",
        "",
        NOTES,
    ]
    md += [f"![{p}]({p})" for p in pictures]
    (sweep / "report.md").write_text("\n".join(md) + "\n")
    return text


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m experiments.compare <sweep dir>", file=sys.stderr)
        return 2
    sweep = Path(argv[0])
    print(report(sweep))
    print(f"\nwrote {sweep / 'report.md'}, report.csv and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
