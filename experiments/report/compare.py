"""Turn a sweep into a report: `python -m experiments.report.compare <sweep dir>` (or `make compare`).

Reads every job's metrics.json and rank 0's TensorBoard events, then writes into the sweep dir
report.md, report.csv and PNG plots, and prints the table.
"""

from __future__ import annotations

import csv
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from experiments.measure.metrics import tb_dir  # noqa: E402
from experiments.measure.record import METRICS_FILE, RunRecord, Tag  # noqa: E402
from parallel.registry import REFERENCE  # noqa: E402

MiB = 2**20
# Appended to a timing cell when the job's ranks outnumbered the node's cores/GPUs.
OVERSUB = " (oversub.)"
HOLLOW_NOTE = "hollow: ranks > cores/GPUs, timing not meaningful"


@dataclass
class Job:
    name: str
    dir: Path
    r: RunRecord
    loss_curve: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        r = self.r
        extra = f" {r.schedule} m={r.microbatches}" if r.schedule else ""
        if r.ac != "none":
            extra += f" ac={r.ac}" + (f"/{r.ac_every}" if r.ac_every > 1 else "")
        extra += " compiled" if r.compile else ""
        for axis in ("cp", "ep"):
            if r.degrees.get(axis, 1) > 1:
                extra += f" {axis}={r.degrees[axis]}"
        if r.experts:
            extra += f" E={r.experts}"
        if r.degrees.get("cp", 1) > 1 or r.seq_len and self._varies_seq:
            extra += f" s={r.seq_len}"
        return f"{r.strategy}{extra} ws={r.world_size}"

    # Set by load_jobs where the sweep's jobs differ in sequence length: the label says which.
    _varies_seq: bool = False

    def axis_wire(self) -> dict[str, float]:
        """Bytes this job's ranks send per step on each mesh axis (mean over ranks, ring model)."""
        out: dict[str, list[float]] = {}
        for r in self.r.ranks:
            for tag, value in (r or {}).items():
                key = Tag.comm_axis(tag)
                if key is not None:
                    out.setdefault(key[0], []).append(value)
        n = max(len(self.r.ranks), 1)
        return {axis: sum(v) / n for axis, v in out.items()}

    def rank_memory(self) -> float | None:
        """Model state + activations on the rank that holds most (MiB), where both are measured."""
        both = self.r.tracked_memory_bytes()
        return None if both is None else both / MiB

    def rank_mean(self, key: str) -> float | None:
        values = [r[key] for r in self.r.ranks if r and key in r]
        return statistics.mean(values) if values else None

    def rank_max(self, key: str) -> float | None:
        values = [r[key] for r in self.r.ranks if r and key in r]
        return max(values) if values else None

    def theory(self, key: str) -> float | None:
        return self.r.theory.get(key)

    def measured_wire(self) -> float | None:
        return self.rank_mean(Tag.COMM_TOTAL_WIRE)

    def theory_wire(self) -> float | None:
        """The predicted bytes sent, where every collective's are predicted (an all-to-all's are
        the router's to decide: then none)."""
        keys = [k for k in self.r.theory if Tag.is_theory_wire(k)]
        if any(
            k.endswith("_calls") and k.replace("_calls", "_wire_bytes") not in self.r.theory
            for k in self.r.theory
        ):
            return None
        return sum(self.r.theory[k] for k in keys) if keys else None


def tb_losses(job_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir(job_dir, 0)), size_guidance={"scalars": 0})
    acc.Reload()
    if Tag.LOSS not in acc.Tags()["scalars"]:
        return []
    return [e.value for e in sorted(acc.Scalars(Tag.LOSS), key=lambda e: e.step)]


def load_jobs(sweep: Path) -> list[Job]:
    jobs = []
    for metrics in sorted(sweep.rglob(METRICS_FILE)):
        d = metrics.parent
        jobs.append(Job(str(d.relative_to(sweep)) or d.name, d, RunRecord.read(d), tb_losses(d)))
    if len({j.r.seq_len for j in jobs}) > 1:
        for j in jobs:
            j._varies_seq = True
    return jobs


def _reference(job: Job, jobs: list[Job]) -> Job | None:
    """The single-process run of the same experiment, when the sweep has one."""
    key = ("model", "dataset", "global_batch_size", "steps", "optimizer")
    same = [j for j in jobs if j.r.world_size == 1 and all(getattr(j.r, k) == getattr(job.r, k) for k in key)]
    same.sort(key=lambda j: j.r.strategy != REFERENCE)
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


def _timing(cell: str, meaningful: bool) -> str:
    """A measured timing (throughput, scaling, bubble), marked when the machine could not give it."""
    return cell if meaningful or not cell else cell + OVERSUB


def rows(jobs: list[Job]) -> list[dict[str, str]]:
    base: dict[str, Job] = {}
    for j in jobs:
        if j.r.world_size == 1:
            base.setdefault(j.r.strategy, j)
    single = next((j for j in jobs if j.r.strategy == REFERENCE), None)
    out = []
    for j in sorted(jobs, key=lambda j: (j.r.strategy, j.r.world_size, j.name)):
        ws, thr = j.r.world_size, j.r.samples_per_s
        ref_job = base.get(j.r.strategy, single)
        ref_thr = ref_job.r.samples_per_s if ref_job else None
        ok = j.r.timing_meaningful
        ref = _reference(j, jobs)
        mem, mem_t = j.rank_max(Tag.MODEL_STATE_BYTES), j.theory(Tag.THEORY_MODEL_STATE)
        act, act_t = j.rank_max(Tag.ACTIVATIONS), j.rank_max(Tag.THEORY_ACTIVATIONS)
        wire, wire_t = j.measured_wire(), j.theory_wire()
        bubble, bubble_t = j.rank_mean(Tag.BUBBLE), j.theory(Tag.THEORY_BUBBLE)
        dev = _max_dev(j.r.losses, ref.r.losses) if ref and ref is not j else None
        eff = f"{thr / (ws * ref_thr):.2f}" if ref_thr else ""
        out.append(
            {
                "job": j.name,
                "strategy": j.label,
                "world": str(ws),
                "samples/s": _timing(f"{thr:.1f}", ok),
                "scaling eff": _timing(eff, ok and (ref_job is None or ref_job.r.timing_meaningful)),
                "state MiB (max rank)": _fmt(mem, MiB, 3),
                "theory MiB": _fmt(mem_t, MiB, 3),
                "mem Δ": _pct(mem, mem_t),
                "paper MiB": _fmt(j.theory(Tag.THEORY_PAPER_MODEL_STATE), MiB, 3),
                "act MiB (max rank)": _fmt(act, MiB, 3),
                "theory act MiB": _fmt(act_t, MiB, 3),
                "act Δ": _pct(act, act_t),
                "compile s": _fmt(j.r.compile_s, 1, 1),
                "sent MiB/step": _fmt(wire, MiB, 3),
                "theory sent": _fmt(wire_t, MiB, 3),
                "comm Δ": _pct(wire, wire_t),
                "bubble": _timing(_fmt(bubble, 1, 3), ok),
                "theory bubble": _fmt(bubble_t, 1, 3),
                "final loss": f"{j.r.final_loss:.5f}",
                "val loss": _fmt(j.r.val_loss, 1, 5),
                "val acc": _fmt(j.r.val_acc, 1, 4),
                "val ppl": _fmt(j.r.val_ppl, 1, 3),
                "max loss dev vs 1 proc": "" if dev is None else f"{dev:.1e}",
                **_planned(j),
            }
        )
    return out


def _planned(j: Job) -> dict[str, str]:
    """The advisor's prediction for the job's own config (metrics.json's `plan`) beside what ran."""
    p = j.r.plan or {}
    step_p, mem_p = p.get("step_time_s"), p.get("tracked_memory_bytes")
    mem = j.r.tracked_memory_bytes()
    return {
        "step s": _timing(f"{j.r.step_time_s:.4g}", j.r.timing_meaningful),
        "plan step s": _fmt(step_p, 1, 4),
        "plan step Δ": _timing(_pct(j.r.step_time_s, step_p), j.r.timing_meaningful),
        "plan mem MiB": _fmt(mem_p, MiB, 3),
        "plan mem Δ": _pct(mem, mem_p),
    }


def plot_plan(jobs: list[Job], path: Path) -> bool:
    """Predicted against measured step time, one point per job (hollow: ranks outnumbered cores)."""
    js = [j for j in jobs if (j.r.plan or {}).get("step_time_s")]
    if not js:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 5))
    xs = [j.r.plan["step_time_s"] for j in js]  # type: ignore[index]
    ys = [j.r.step_time_s for j in js]
    oks = [j.r.timing_meaningful for j in js]
    for ok, face, label in ((True, "C0", "jobs"), (False, "none", "ranks > cores (not meaningful)")):
        pts = [(x, y) for x, y, o in zip(xs, ys, oks, strict=True) if o == ok]
        if pts:
            ax.plot(*zip(*pts, strict=True), ls="", marker="o", color="C0", markerfacecolor=face, label=label)
    lo, hi = min(xs + ys), max(xs + ys)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = predicted")
    ax.set(xscale="log", yscale="log", xlabel="predicted step time (s)", ylabel="measured step time (s)")
    ax.set_title("The advisor's prediction against each job", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def timing_notes(jobs: list[Job]) -> list[str]:
    """One line per distinct reason a job's timings are not findings, naming its jobs."""
    by_note: dict[str, list[str]] = {}
    for j in sorted(jobs, key=lambda j: j.name):
        if not j.r.timing_meaningful:
            by_note.setdefault(j.r.timing_note or "ranks outnumber this node's cores/GPUs", []).append(j.name)
    return [f"{OVERSUB.strip()} {', '.join(names)}: {note}" for note, names in by_note.items()]


def table(rs: list[dict[str, str]]) -> str:
    cols = list(rs[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rs)) for c in cols}
    lines = [" | ".join(c.ljust(widths[c]) for c in cols), "-|-".join("-" * widths[c] for c in cols)]
    lines += [" | ".join(r[c].ljust(widths[c]) for c in cols) for r in rs]
    return "\n".join(lines)


def _by_strategy(jobs: list[Job]) -> dict[str, list[Job]]:
    groups: dict[str, list[Job]] = {}
    for j in sorted(jobs, key=lambda j: j.r.world_size):
        groups.setdefault(j.label.rsplit(" ws=", 1)[0], []).append(j)
    return groups


def _points(ax, xs: list[float], ys: list[float], oks: list[bool], color: str, label: str) -> None:
    """A line with filled markers where timing is meaningful and hollow ones where it is not."""
    ax.plot(xs, ys, marker="o", color=color, label=label, markevery=[i for i, ok in enumerate(oks) if ok])
    bad = [(x, y) for x, y, ok in zip(xs, ys, oks, strict=True) if not ok]
    if bad:
        ax.plot(*zip(*bad, strict=True), ls="", marker="o", color=color, markerfacecolor="none")


def plot_throughput(jobs: list[Job], path: Path) -> None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, js) in enumerate(_by_strategy(jobs).items()):
        color = f"C{i % 10}"
        ws = [j.r.world_size for j in js]
        thr = [j.r.samples_per_s for j in js]
        oks = [j.r.timing_meaningful for j in js]
        _points(ax, ws, thr, oks, color, name)
        if ws[0] == 1:
            eff = [t / (w * thr[0]) for t, w in zip(thr, ws, strict=True)]
            _points(ax2, ws, eff, [ok and oks[0] for ok in oks], color, name)
    ax.set(xlabel="world size", ylabel="samples/s (global)", title="Throughput")
    ax2.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax2.set(xlabel="world size", ylabel="throughput / (N × 1-rank throughput)", title="Scaling efficiency")
    oversub = any(not j.r.timing_meaningful for j in jobs)
    for a in (ax, ax2):
        a.set_xticks(sorted({j.r.world_size for j in jobs}))
        handles, labels = a.get_legend_handles_labels()
        if handles:
            if oversub:
                handles.append(Line2D([], [], marker="o", color="grey", markerfacecolor="none", ls=""))
                labels.append(HOLLOW_NOTE)
            a.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(jobs: list[Job], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, js) in enumerate(_by_strategy(jobs).items()):
        color = f"C{i}"
        pts = [
            (j.r.world_size, r[Tag.MODEL_STATE_BYTES] / MiB)
            for j in js
            for r in j.r.ranks
            if r and Tag.MODEL_STATE_BYTES in r
        ]
        if not pts:
            continue
        ax.scatter(*zip(*pts, strict=True), color=color, label=f"{name} (each rank)", s=22)
        th = [(j.r.world_size, j.theory(Tag.THEORY_MODEL_STATE)) for j in js]
        th = [(w, v / MiB) for w, v in th if v]
        if th:
            ax.plot(*zip(*th, strict=True), color=color, ls="--", lw=1, label=f"{name} theory")
    ax.set(
        xlabel="world size",
        ylabel="model-state MiB per rank",
        title="Per-rank memory: params + grads + optimizer state",
    )
    ax.set_xticks(sorted({j.r.world_size for j in jobs}))
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
        curve = j.loss_curve or j.r.losses
        ax.plot(range(1, len(curve) + 1), curve, label=j.label, lw=1)
    ax.set(xlabel="step", ylabel="loss (global mean)", title="Loss curves")
    ax.legend(fontsize=7)
    devs = [
        (j.label, _max_dev(j.r.losses, r.r.losses)) for j in jobs if (r := _reference(j, jobs)) and r is not j
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


def plot_val_loss(jobs: list[Job], path: Path) -> bool:
    """Time to quality: each job's held-out loss against its training seconds (evaluations left out)."""
    js = [j for j in jobs if j.r.evals]
    if not js:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, j in enumerate(sorted(js, key=lambda j: j.name)):
        hollow = not j.r.timing_meaningful
        ax.plot(
            [e["wall_s"] for e in j.r.evals],
            [e["val_loss"] for e in j.r.evals],
            marker="o",
            color=f"C{i % 10}",
            markerfacecolor="none" if hollow else f"C{i % 10}",
            label=j.label + (OVERSUB if hollow else ""),
        )
    ax.set(
        xlabel="training wall time (s, evaluation excluded)", ylabel="held-out loss", title="Time to quality"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats on both counts (less memory, more throughput), by memory."""
    front: list[tuple[float, float]] = []
    for m, t in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or t > front[-1][1]:
            front.append((m, t))
    return front


def plot_levers(jobs: list[Job], path: Path) -> bool:
    """Memory per rank against throughput, one point per job: the trade the memory levers make."""
    js = [j for j in jobs if j.rank_memory() is not None]
    if not js:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, j in enumerate(js):
        ok = j.r.timing_meaningful
        ax.scatter(
            [j.rank_memory()], [j.r.samples_per_s], color=f"C{i % 10}", facecolors=None if ok else "none"
        )
        ax.annotate(
            j.label,
            (j.rank_memory(), j.r.samples_per_s),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    front = pareto([(j.rank_memory(), j.r.samples_per_s) for j in js])
    ax.plot(*zip(*front, strict=True), color="grey", ls=":", lw=1, label="Pareto front")
    ax.set(
        xlabel="MiB per rank: model state + activations (the fullest rank)",
        ylabel="samples/s (global)",
        title="Memory levers: what each job holds against what it trains",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _stacked_bars(
    jobs: list[Job], parts: list[tuple[str, list[float]]], ylabel: str, title: str, path: Path, legend: dict
) -> None:
    """One bar per job, stacked by part (label, one height per job); parts all zero are left out."""
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(jobs) + 3), 4.5))
    bottom = [0.0] * len(jobs)
    for i, (label, heights) in enumerate(parts):
        if not any(heights):
            continue
        ax.bar(range(len(jobs)), heights, bottom=bottom, color=f"C{i}", label=label)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(range(len(jobs)), [j.label for j in jobs], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_axes(jobs: list[Job], path: Path) -> bool:
    """Bytes each job sends per step, stacked by the mesh axis they travel on: which axis carries
    a strategy's traffic (HSDP's across replica groups is only the shards' all-reduce)."""
    wires = [(j, j.axis_wire()) for j in jobs]
    wires = [(j, w) for j, w in wires if w]
    if not wires:
        return False
    axes = sorted({a for _, w in wires for a in w})
    parts = [(axis, [w.get(axis, 0.0) / MiB for _, w in wires]) for axis in axes]
    js = [j for j, _ in wires]
    _stacked_bars(
        js,
        parts,
        "MiB sent per rank per step (ring model)",
        "Communication per mesh axis",
        path,
        {"fontsize": 8, "title": "axis"},
    )
    return True


def plot_axis_scaling(jobs: list[Job], path: Path) -> bool:
    """Where a sweep moves a parallel axis (cp or ep) against what it splits (sequence length,
    experts): memory per rank (model state, and with activations) and what the axis's own
    collective sends (the ring's sends, the all-to-all), one line per degree."""
    axes = (
        ("ep", "experts", "experts per mixture", "all_to_all"),
        ("cp", "seq_len", "sequence length", "send"),
    )
    for axis, size, what, coll in axes:
        js = [j for j in jobs if getattr(j.r, size)]
        if not any(j.r.degrees.get(axis, 1) > 1 for j in js):
            continue
        fig, (mem, sent) = plt.subplots(1, 2, figsize=(11, 4.5))
        for i, degree in enumerate(sorted({j.r.degrees.get(axis, 1) for j in js})):
            line = sorted(
                ((getattr(j.r, size), j) for j in js if j.r.degrees.get(axis, 1) == degree),
                key=lambda p: p[0],
            )
            xs, label = [x for x, _ in line], f"{axis}={degree}"
            state = [(j.rank_max(Tag.MODEL_STATE_BYTES) or 0.0) / MiB for _, j in line]
            mem.plot(xs, state, marker="o", color=f"C{i}", label=f"{label}: model state")
            mem.plot(
                xs,
                [j.rank_memory() or 0.0 for _, j in line],
                marker="o",
                ls="--",
                color=f"C{i}",
                label=f"{label}: + activations",
            )
            wire = [(j.rank_mean(Tag.comm(coll, "wire_bytes")) or 0.0) / MiB for _, j in line]
            sent.plot(xs, wire, marker="o", color=f"C{i}", label=label)
        mem.set(
            xlabel=what, ylabel="MiB per rank (the fullest rank)", title=f"Memory per rank against {what}"
        )
        sent.set(xlabel=what, ylabel=f"MiB sent per rank per step by {coll}", title=f"What {axis} sends")
        for a in (mem, sent):
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True
    return False


def plot_time(jobs: list[Job], path: Path) -> bool:
    """One stacked bar per profiled job (train.profile): its step split into compute, exposed
    communication per mesh axis, the pipeline's bubble and the rest, the mean over its ranks."""
    js = [j for j in jobs if j.rank_mean("time/step") is not None]
    if not js:
        return False
    exposed = sorted(
        {k for j in js for r in j.r.ranks for k in (r or {}) if k.startswith("time/exposed_comm/")}
    )
    parts = [
        (
            part.removeprefix("time/").replace("exposed_comm/", "exposed comm: "),
            [1000 * (j.rank_mean(part) or 0.0) for j in js],
        )
        for part in ["time/compute", *exposed, "time/bubble", "time/other"]
    ]
    _stacked_bars(
        js,
        parts,
        "ms per step (profiled steps, mean over ranks)",
        "Where the step's time goes",
        path,
        {"fontsize": 7},
    )
    return True


def plot_bubble(jobs: list[Job], path: Path) -> bool:
    js = [j for j in jobs if j.rank_mean(Tag.BUBBLE) is not None]
    if not js:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = _by_strategy(js)
    for i, (name, group) in enumerate(groups.items()):
        ok = group[0].r.timing_meaningful
        ax.scatter(
            [i],
            [group[0].rank_mean(Tag.BUBBLE)],
            edgecolors=f"C{i}",
            facecolors=f"C{i}" if ok else "none",
            label=f"{name} measured" + ("" if ok else OVERSUB),
        )
        t = group[0].theory(Tag.THEORY_BUBBLE)
        if t is not None:
            ax.scatter([i], [t], color=f"C{i}", marker="_", s=400, label=f"{name} theory")
    ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize=8)
    ax.set(
        ylabel="bubble share of step time", title="Pipeline bubble: measured vs (p−1)/(v·m+p−1)", ylim=(0, 1)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


NOTES = """## Reading this report
- **(oversub.)** marks throughput, scaling eff and bubble of a job whose ranks outnumbered the node's
  cores (CPU) or GPUs: they measure the wait for a core, not the strategy, so read nothing into them.
  The throughput plot draws those points hollow.
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
- **act MiB** = bytes autograd keeps for backward in one micro-step on the rank that keeps most,
  counted by saved-tensor hooks on a sampled step; **theory act** is Korthikanti et al.'s count
  adapted to the model (docs/memory.md). `memory_levers.png` plots model state + activations
  against throughput for every job, with the Pareto front: what activation checkpointing, sharding
  and compile trade. **compile s** = the first step's time less a steady step's.
- **axes.png** stacks what each job sends per step by the mesh axis it travels on (the axis of the
  collective's process group; `world` where it spans every rank). HSDP's traffic across replica
  groups is the `dp_replicate` bar alone; FSDP's gathers span them all. **axis_scaling.png** (a
  sweep of cp or ep) plots memory per rank and that axis's traffic against what it splits: context
  parallelism against sequence length, expert parallelism against the number of experts.
- **time.png** (jobs run with `train.profile=true`) stacks each job's profiled step: compute,
  communication left exposed per mesh axis (what the step waits for), the pipeline's bubble and
  the rest (docs/measurement.md: where the time goes). Overlapped communication is in metrics.json.
- **val loss / acc / ppl** = the last held-out evaluation (accuracy for classification, perplexity
  for language models). `val_loss.png` plots each job's held-out loss against its training wall
  time with evaluations left out: time to quality, which an oversubscribed job (hollow) distorts.
- **plan step s / plan mem MiB** = the strategy advisor's prediction for the job's own config on
  `cluster` (metrics.json's `plan`, made before it ran from a meta-device profile and the cluster's
  calibration; docs/plan.md), beside the measured step time and model state + one micro-batch's
  activations; **Δ** = (measured − predicted) / predicted. `plan.png` plots one against the other.
  `make plan ARGS="check=<sweep>"` sums the errors over the sweep (MAPE, Spearman).
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
    # Drawn where the sweep has what they show.
    optional = (
        (plot_val_loss, "val_loss.png"),
        (plot_bubble, "bubble.png"),
        (plot_levers, "memory_levers.png"),
        (plot_time, "time.png"),
        (plot_axes, "axes.png"),
        (plot_axis_scaling, "axis_scaling.png"),
        (plot_plan, "plan.png"),
    )
    pictures += [name for plot, name in optional if plot(jobs, sweep / name)]
    text = table(rs)
    notes = timing_notes(jobs)
    md = [
        f"# paralab sweep report: {sweep.name}",
        "",
        f"{len(jobs)} jobs.",
        "",
        "```",
        text,
        "```",
        "",
    ]
    md += [*notes, ""] if notes else []
    md += [NOTES]
    md += [f"![{p}]({p})" for p in pictures]
    (sweep / "report.md").write_text("\n".join(md) + "\n")
    return "\n".join([text, *notes])


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m experiments.report.compare <sweep dir>", file=sys.stderr)
        return 2
    sweep = Path(argv[0])
    print(report(sweep))
    print(f"\nwrote {sweep / 'report.md'}, report.csv and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
