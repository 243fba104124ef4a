"""Where a step's time goes, read from a torch.profiler trace of this rank: compute, communication
overlapped with it and exposed (per mesh axis), the pipeline's bubble, and the rest.

Compute is what the rank computes: on CPU the aten ops of the thread that runs the step (autograd
runs CPU backward on the calling thread), on CUDA the kernels that are not NCCL's. Communication
is each collective's execution: gloo's worker-thread spans (`gloo:<op>`), or NCCL's kernels. A
collective's process group, and so its mesh axis, comes from torch's flight recorder, whose entries
are the collectives this rank issued, in order: the k-th span of a kind is the k-th entry of it.

The profiled steps are cut into elementary pieces at every start and end, and each piece goes to
exactly one bucket: compute if the rank computes then (communication under it is overlapped),
else exposed communication of the axis whose collective started first, else other (Python, host
syncs, data). On a pipeline's ranks the pp axis's waiting, and the rest that is neither compute
nor another axis's collective, is the bubble: gloo's send and recv leave no span of their own, so
there the bubble holds the host's overhead between stage computations too. So compute + exposed
+ bubble + other is the step time, exactly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from parallel.mesh import axis_of

# What a comm event's name says it is: gloo's spans and the flight recorder name ops `gloo:<op>`,
# NCCL kernels `ncclDevKernel_AllReduce_...`.
_NCCL = {
    "AllReduce": "all_reduce",
    "AllGather": "all_gather",
    "ReduceScatter": "reduce_scatter",
    "Broadcast": "broadcast",
    "SendRecv": "send",
    "Send": "send",
    "Recv": "recv",
    "AllToAll": "all_to_all",
}


def _kind(name: str) -> str | None:
    if name.startswith(("gloo:", "nccl:")):
        return name.split(":", 1)[1]
    if name.startswith("nccl"):
        for key, op in _NCCL.items():
            if key in name:
                return op
    return None


@dataclass
class Split:
    steps: int
    step_s: float
    compute_s: float
    other_s: float
    bubble_s: float
    exposed_s: dict[str, float] = field(default_factory=dict)
    overlapped_s: dict[str, float] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """Seconds per step, as TensorBoard and metrics.json carry them."""
        out = {
            "time/step": self.step_s,
            "time/compute": self.compute_s,
            "time/bubble": self.bubble_s,
            "time/other": self.other_s,
        }
        out |= {f"time/exposed_comm/{a}": s for a, s in sorted(self.exposed_s.items())}
        out |= {f"time/overlapped_comm/{a}": s for a, s in sorted(self.overlapped_s.items())}
        return out


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def split(trace: dict, recorded: list[dict], bubble_axis: str | None) -> Split | None:
    """The split of the profiled steps of `trace` (Chrome trace JSON); `recorded`: the flight
    recorder's entries (oldest first) at the end of the window; `bubble_axis`: a pipeline's pp
    axis, whose exposed waiting is its bubble. None without ProfilerStep marks."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")]
    if not steps:
        return None
    main = steps[0]["tid"]
    window = (min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps))
    cuda = any(e.get("cat") == "kernel" for e in events)
    if cuda:
        kernels = [e for e in events if e.get("cat") == "kernel"]
        compute = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if _kind(e["name"]) is None]
        comm_events = [e for e in kernels if _kind(e["name"]) is not None]
    else:
        # Every aten op of the step's thread: what holds no aten op (autograd's bookkeeping, a
        # wait for a collective, Python between ops) is not compute.
        compute = [
            (e["ts"], e["ts"] + e["dur"])
            for e in events
            if e["tid"] == main and str(e["name"]).startswith("aten::")
        ]
        comm_events = [e for e in events if e["tid"] != main and str(e["name"]).startswith("gloo:")]
    comm = _attribute(comm_events, recorded)
    return _sweep(window, len(steps), _union(compute), comm, bubble_axis)


def _attribute(comm_events: list[dict], recorded: list[dict]) -> list[tuple[float, float, str]]:
    """(start, end, axis) of each collective: the k-th of a kind in the trace is the k-th of that
    kind among the recorder's last entries."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for e in sorted(comm_events, key=lambda e: e["ts"]):
        kind = _kind(e["name"])
        if kind is not None:
            by_kind[kind].append(e)
    entries: dict[str, list[dict]] = defaultdict(list)
    for r in recorded:
        kind = _kind(str(r.get("profiling_name", "")))
        if kind is not None:
            entries[kind].append(r)
    out = []
    for kind, spans in by_kind.items():
        mine = entries.get(kind, [])[-len(spans) :]
        offset = len(spans) - len(mine)  # spans with no entry left (a short buffer): axis unknown
        for i, e in enumerate(spans):
            j = i - offset
            group = (mine[j].get("process_group") or ["?"])[0] if j >= 0 else "?"
            out.append((e["ts"], e["ts"] + e["dur"], axis_of(str(group))))
    return out


def _sweep(
    window: tuple[float, float],
    n_steps: int,
    compute: list[tuple[float, float]],
    comm: list[tuple[float, float, str]],
    bubble_axis: str | None,
) -> Split:
    lo, hi = window
    cuts = {lo, hi}
    for a, b in compute:
        cuts |= {min(max(a, lo), hi), min(max(b, lo), hi)}
    for a, b, _ in comm:
        cuts |= {min(max(a, lo), hi), min(max(b, lo), hi)}
    points = sorted(cuts)
    compute_s = other_s = bubble_s = 0.0
    exposed: dict[str, float] = defaultdict(float)
    overlapped: dict[str, float] = defaultdict(float)
    ci = 0
    comm_sorted = sorted(comm)
    for a, b in zip(points, points[1:], strict=False):
        if b <= a:
            continue
        mid, d = (a + b) / 2, (b - a) / 1e6  # trace times are microseconds
        while ci < len(compute) and compute[ci][1] <= mid:
            ci += 1
        busy = ci < len(compute) and compute[ci][0] <= mid < compute[ci][1]
        active = [c for c in comm_sorted if c[0] <= mid < c[1]]
        if busy:
            compute_s += d
            for axis in {c[2] for c in active}:
                overlapped[axis] += d
        elif active:
            axis = active[0][2]  # the collective that started first holds the rank
            if axis == bubble_axis:
                bubble_s += d
            else:
                exposed[axis] += d
        elif bubble_axis is not None:
            # A pipeline stage that neither computes nor runs a traced collective waits on its
            # neighbours (gloo's send and recv leave no span of their own): its bubble.
            bubble_s += d
        else:
            other_s += d
    n = max(n_steps, 1)
    return Split(
        steps=n_steps,
        step_s=(hi - lo) / 1e6 / n,
        compute_s=compute_s / n,
        other_s=other_s / n,
        bubble_s=bubble_s / n,
        exposed_s={k: v / n for k, v in exposed.items()},
        overlapped_s={k: v / n for k, v in overlapped.items()},
    )
