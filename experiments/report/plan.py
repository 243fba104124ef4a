"""`make plan`: which parallelism for this model on this cluster, and what each will cost.

    python -m experiments.report.plan model=llama3_8b dataset=tokens dataset.seq_len=8192 \\
        dataset.vocab_size=128256 train.global_batch_size=512 cluster=h100_8 cluster.nodes=8
    python -m experiments.report.plan check=outputs/sweeps/<sweep>   # predicted vs measured

Every configuration paralab can run (experiments/plan/space.py) is predicted (memory per rank,
step-time split, throughput, MFU); those that do not fit are ruled out by how much, the rest ranked
by step time. Writes plan.md, plan.csv and plan.png. With check=, each job of a finished sweep
is predicted from its own frozen config and held against its measurements: MAPE of step time and
of memory, and Spearman's rank correlation of the step times.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
from pathlib import Path

from experiments.config.compose_errors import COMPOSE_ERRORS, compose_error_line
from experiments.config.ranges import finite_number
from experiments.config.schema import ClusterConfig, Config, ConfigError, load_frozen, typed_config
from experiments.plan.cluster import GiB, Machine, machine
from experiments.plan.predict import Prediction, predict_config
from experiments.plan.profile import ModelProfile, profile_model
from experiments.plan.space import candidates
from experiments.report.parity import compose_config

OWN_KEYS = ("check", "out", "top")
MiB = 2**20


def _split(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    own, rest = {}, []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key in OWN_KEYS:
            own[key] = value
        else:
            rest.append(a)
    return own, rest


def load(overrides: list[str], calibrated: bool = True) -> tuple[Config, Machine]:
    """The config, every key known and every number in range, and its cluster."""
    from experiments.config.ranges import check_ranges
    from experiments.run.keys import check_known

    raw = compose_config(overrides)
    check_known(raw)
    cfg = typed_config(raw)
    check_ranges(cfg)
    return cfg, machine(cfg.cluster, calibrated)


def _top(own: dict[str, str]) -> int:
    value = own.get("top", "20")
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ConfigError(f"top={value} must be a whole number >= 1 (rows in plan.md's tables)")
    return int(value)


def _out(own: dict[str, str], cfg: Config) -> Path:
    """A new folder, or one that holds no plan yet: a plan written before is never overwritten."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(own.get("out") or f"outputs/plans/{stamp}_{cfg.model.label}_{cfg.cluster.name}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder for plan.md, plan.csv and plan.png")
    held = [n for n in ("plan.md", "plan.csv", "plan.png") if (out / n).exists()]
    if held:
        raise ConfigError(f"out={out} already holds {', '.join(held)}; give another out= or move them")
    return out


def _model(cfg: Config):
    from data import dataset_spec
    from models import check_model_fits_data

    data = dataset_spec(cfg.dataset)
    return check_model_fits_data(cfg.model, data, cfg.dataset.name), data


def plan(cfg: Config, m: Machine) -> tuple[list[Prediction], ModelProfile]:
    model, data = _model(cfg)
    profile = profile_model(model, data)
    out = [
        predict_config(c, d, profile, data, m, overrides)
        for c, d, overrides in candidates(cfg, m.devices, m.devices_per_node, model)
    ]
    return rank(out), profile


def rank(predictions: list[Prediction]) -> list[Prediction]:
    """Fitting ones first, fastest first (no step time: after those with one); then the rest by
    how far over they are."""
    return sorted(
        predictions,
        key=lambda p: (not p.fits, p.time is None, p.time.step_s if p.time and p.fits else p.over_bytes),
    )


def nowhere(cfg: Config, m: Machine, predictions: list[Prediction], profile: ModelProfile) -> str:
    """One line: the model fits no configuration; the nearest one, and the cluster that would fit."""
    closest = min(predictions, key=lambda p: p.over_bytes) if predictions else None
    line = f"model={cfg.model.label} ({profile.psi:,} parameters) fits no configuration on {m.describe()}"
    if closest is None:
        g = cfg.train.global_batch_size
        return line + (
            f": none of paralab's uses all {m.devices} devices with train.global_batch_size={g} (data "
            "parallelism splits the batch; tp, pp, cp and ep are bounded by the model's heads, blocks, "
            "sequence and experts); lower cluster.nodes or raise train.global_batch_size"
        )
    line += (
        f"; the closest, {closest.label}, needs {closest.total / GiB:.1f} GiB per rank "
        f"({closest.over_bytes / GiB:.1f} GiB over)"
    )
    model, data = _model(cfg)
    for nodes in (2**i for i in range(1, 13)):
        if nodes <= m.cfg.nodes:
            continue
        bigger = dataclasses.replace(m, cfg=dataclasses.replace(m.cfg, nodes=nodes))
        if any(
            predict_config(c, d, profile, data, bigger, o, timed=False).fits
            for c, d, o in candidates(cfg, bigger.devices, bigger.devices_per_node, model)
        ):
            return line + f"; it fits on cluster.nodes={nodes} ({bigger.devices} devices)"
    return line + "; lower train.global_batch_size or dataset.seq_len, or use larger devices"


def _cell(x: float | None, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table_rows(predictions: list[Prediction]) -> list[dict[str, str]]:
    rows = []
    for i, p in enumerate(predictions, 1):
        t = p.time
        rows.append(
            {
                "rank": str(i) if p.fits else "-",
                "config": p.label,
                "GiB/rank": f"{p.total / GiB:.2f}",
                "fits": "yes" if p.fits else f"no, +{p.over_bytes / GiB:.2f} GiB",
                "step s": _cell(t.step_s if t else None, ".4g"),
                "compute s": _cell(t.compute_s if t else None, ".4g"),
                "exposed comm s": _cell(t.exposed_total_s if t else None, ".3g"),
                "bubble s": _cell(t.bubble_s if t else None, ".3g"),
                "samples/s": _cell(p.samples_per_s, ".4g"),
                "tokens/s/device": _cell(
                    p.tokens_per_s / p.degrees.world_size if p.tokens_per_s else None, ".4g"
                ),
                "MFU": _cell(p.mfu, ".1%"),
                "notes": "; ".join(p.notes),
            }
        )
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(none)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(predictions: list[Prediction], m: Machine, path: Path, top: int = 15) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in predictions if p.time is not None][:top]
    if not shown:
        return
    axes = sorted({a for p in shown for a in p.time.exposed_s})
    fig, (ax, mx) = plt.subplots(1, 2, figsize=(13, 0.35 * len(shown) + 2.5), sharey=True)
    labels = [p.label.replace("strategy.", "").replace("strategy=", "") for p in shown]
    ys = range(len(shown))
    left = [0.0] * len(shown)
    parts = [("compute", [p.time.compute_s for p in shown])]
    parts += [(f"exposed comm: {a}", [p.time.exposed_s.get(a, 0.0) for p in shown]) for a in axes]
    parts += [("bubble", [p.time.bubble_s for p in shown])]
    for i, (name, widths) in enumerate(parts):
        if any(widths):
            ax.barh(ys, widths, left=left, color=f"C{i}", label=name)
            left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="predicted step time (s)", title="where the step goes")
    ax.legend(fontsize=7)
    mx.barh(ys, [p.total / GiB for p in shown], color=["C2" if p.fits else "C3" for p in shown])
    mx.axvline(
        m.memory_per_rank(min(shown[0].degrees.world_size, m.devices_per_node)) / GiB, color="k", ls="--"
    )
    mx.set(xlabel="predicted GiB per rank (dashed: what a rank has)", title="memory")
    fig.suptitle(m.describe(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plan(
    cfg: Config, m: Machine, predictions: list[Prediction], profile: ModelProfile, out: Path, top: int
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    records = [p.as_record() for p in predictions]
    fields = sorted({k for r in records for k in r}, key=lambda k: (k not in records[0], k))
    with (out / "plan.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            w.writerow({k: ("; ".join(v) if isinstance(v, list) else v) for k, v in r.items()})
    fitting = [p for p in predictions if p.fits]
    ruled_out = [p for p in predictions if not p.fits]
    head = (
        f"model={cfg.model.label} ({profile.psi / 1e9:.3g}B parameters), dataset={cfg.dataset.name}"
        f" (seq {cfg.dataset.seq_len}), global batch {cfg.train.global_batch_size}, {cfg.train.precision}, "
        f"{cfg.train.optimizer}; {m.describe()}"
    )
    best = table_rows(fitting)[:top]
    md = [
        "# paralab plan",
        "",
        head,
        "",
        f"{len(predictions)} configurations paralab can run; {len(fitting)} fit, {len(ruled_out)} ruled out.",
        "",
        f"## The {len(best)} fastest that fit",
        "",
        markdown_table(best),
        "",
        "## Ruled out: over memory (the nearest first)",
        "",
        markdown_table(table_rows(ruled_out)[:top]),
        "",
        "Step time = compute (forward, backward, recompute, optimizer) + exposed communication + bubble, "
        "on the slowest rank (docs/plan.md says how each term is predicted). Memory: the fullest rank's "
        "model state, activations and buffers. Every configuration: plan.csv.",
        "",
        "![plan](plan.png)",
    ]
    (out / "plan.md").write_text("\n".join(md) + "\n")
    plot(predictions, m, out / "plan.png")
    return "\n".join([head, "", markdown_table(best[: min(top, 10)])])


# ---- check=: predicted against measured, over a finished sweep -----------------------------


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (ties take their mean rank)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else float("nan")


@dataclasses.dataclass
class Checked:
    job: str
    config: str
    meaningful: bool
    step_s: float
    predicted_step_s: float | None
    memory: float | None  # model state + activations, the fullest rank
    predicted_memory: float


def check_sweep(sweep: Path, cluster_overrides: list[str]) -> list[Checked]:
    from data import dataset_spec
    from experiments.measure.record import METRICS_FILE
    from experiments.plan import predict_job

    # A sweep's job dirs are its children (or it is one job dir itself): no deeper search, so a
    # wrong path fails at once rather than crawling a disk.
    found = [sweep / METRICS_FILE, *sweep.glob(f"*/{METRICS_FILE}")] if sweep.is_dir() else []
    jobs = sorted(p.parent for p in found if p.is_file())
    if not jobs:
        raise ConfigError(
            f"check={sweep} is not a sweep: no job dir with {METRICS_FILE} under it; give a finished "
            "sweep's dir (outputs/sweeps/<name>) or a job dir"
        )
    # The cluster to predict for is the plan command's (this machine, calibrated, by default);
    # each job's own config is frozen in its dir, so no other key may be overridden.
    other = [o for o in cluster_overrides if not o.lstrip("+~").startswith("cluster")]
    if other:
        raise ConfigError(
            f"{other[0]}: with check= each job is predicted from its own frozen config; only cluster= "
            "and cluster.* may be given"
        )
    cluster = load(cluster_overrides)[0].cluster
    out = []
    for job in jobs:
        r, cfg, degrees, memory = _read_job(sweep, job, cluster)
        p = predict_job(cfg, degrees, dataset_spec(cfg.dataset))
        out.append(
            Checked(
                str(job.relative_to(sweep)) if job != sweep else job.name,
                f"{r.strategy} ws={r.world_size} {cfg.model.label}",
                r.timing_meaningful,
                r.step_time_s,
                p.get("step_time_s"),
                memory,
                p["tracked_memory_bytes"],
            )
        )
    return out


def _read_job(sweep: Path, job: Path, cluster: ClusterConfig):
    """A job's record, its frozen config on the plan's cluster, its degrees and its measured memory;
    one line naming the job where its files are not what a run writes."""
    from experiments.measure.record import RunRecord
    from parallel.mesh import Degrees

    try:
        r = RunRecord.read(job)
        cfg = dataclasses.replace(load_frozen(job), cluster=cluster)
        if not all(type(v) is int and v >= 1 for v in r.degrees.values()):
            raise ValueError(f"degrees {r.degrees} are not whole numbers >= 1")
        degrees = Degrees(**r.degrees)
        if degrees.world_size != r.world_size:
            raise ValueError(f"degrees {r.degrees} do not make world_size={r.world_size!r}")
        # A job that timed no step logs NaN: listed, left out of the error.
        step = r.step_time_s
        if not (step is None or isinstance(step, float | int) and not isinstance(step, bool)):
            raise ValueError(f"step_time_s={step!r}")
        if type(r.timing_meaningful) is not bool:
            raise ValueError(f"timing_meaningful={r.timing_meaningful!r}")
        memory = r.tracked_memory_bytes()
        if not (memory is None or finite_number(memory)):
            raise ValueError(f"measured memory {memory!r}")
    except ConfigError:
        raise
    except Exception as e:  # anything a file edited or cut short can hold: say which job, once
        raise ConfigError(
            f"check={sweep}: job {job.name} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
            "rerun it or move it out of the sweep"
        ) from None
    return r, cfg, degrees, memory


def _measured(x: object) -> bool:
    """A measurement an error can be taken against (a job cut short logs none, or 0)."""
    return finite_number(x) and x > 0  # type: ignore[operator]


def check_summary(rows: list[Checked]) -> dict[str, float]:
    timed = [c for c in rows if c.meaningful and c.predicted_step_s and _measured(c.step_s)]
    mem = [c for c in rows if _measured(c.memory)]
    ape = [abs(c.predicted_step_s - c.step_s) / c.step_s for c in timed]
    mem_err = [abs(c.predicted_memory - c.memory) / c.memory for c in mem]
    return {
        "jobs": len(rows),
        "timed_jobs": len(timed),
        "step_mape": sum(ape) / len(ape) if ape else float("nan"),
        "step_spearman": spearman([c.predicted_step_s for c in timed], [c.step_s for c in timed])
        if len(timed) > 2
        else float("nan"),
        "memory_mape": sum(mem_err) / len(mem_err) if mem_err else float("nan"),
        "memory_max_error": max(mem_err) if mem_err else float("nan"),
    }


def write_check(sweep: Path, rows: list[Checked]) -> str:
    s = check_summary(rows)
    lines = [
        "| job | config | measured step s | predicted | error | memory MiB | predicted | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        err = (
            f"{100 * (c.predicted_step_s - c.step_s) / c.step_s:+.1f}%"
            if c.predicted_step_s and _measured(c.step_s)
            else ""
        )
        if not c.meaningful:
            err += " (oversub., left out)"
        merr = f"{100 * (c.predicted_memory - c.memory) / c.memory:+.1f}%" if _measured(c.memory) else ""
        lines.append(
            f"| {c.job} | {c.config} | {_cell(c.step_s, '.4g')} | {_cell(c.predicted_step_s, '.4g')} | {err} | "
            f"{_cell(c.memory / MiB if c.memory else None, '.2f')} | {c.predicted_memory / MiB:.2f} | {merr} |"
        )
    summary = (
        f"{s['jobs']} jobs, {s['timed_jobs']} timed (ranks <= cores): step time MAPE {s['step_mape']:.1%}, "
        f"Spearman {s['step_spearman']:.3f}; memory (model state + activations) MAPE {s['memory_mape']:.1%}, "
        f"worst {s['memory_max_error']:.1%}"
    )
    try:
        (sweep / "plan_check.md").write_text(
            "# Predicted against measured\n\n" + "\n".join(lines) + f"\n\n{summary}\n"
        )
    except OSError as e:
        raise ConfigError(f"check={sweep}: plan_check.md cannot be written ({e.strerror})") from None
    return "\n".join([*lines, "", summary])


def main(argv: list[str]) -> int:
    own, overrides = _split(argv)
    try:
        if "check" in own:
            print(write_check(Path(own["check"]), check_sweep(Path(own["check"]), overrides)))
            print(f"\nwrote {Path(own['check']) / 'plan_check.md'}")
            return 0
        cfg, m = load(overrides)
        out, top = _out(own, cfg), _top(own)
        t0 = time.perf_counter()
        predictions, profile = plan(cfg, m)
        if not any(p.fits for p in predictions):
            raise ConfigError(nowhere(cfg, m, predictions, profile))
        try:
            text = write_plan(cfg, m, predictions, profile, out, top)
        except OSError as e:
            raise ConfigError(
                f"out={out} cannot be written ({e.strerror}); give a folder you can write"
            ) from None
    except ConfigError as e:
        print(f"paralab: {e}", file=sys.stderr)
        return 2
    except COMPOSE_ERRORS as e:  # a group option or key that does not exist
        print(f"paralab: config error: {compose_error_line(e)}", file=sys.stderr)
        return 2
    print(text)
    print(
        f"\n{len(predictions)} configurations predicted in {time.perf_counter() - t0:.1f} s; wrote {out}/plan.md, plan.csv, plan.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
