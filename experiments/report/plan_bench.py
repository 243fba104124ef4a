"""`make plan-bench`: how well the advisor predicts this machine, against the issue's targets.

Calibrates the machine if its file is missing, runs `experiment=plan_check` (every strategy at 1
and 2 ranks, on a small Llama the host's per-op cost dominates and a wider one its matmuls do:
the preset's grid, then the strategies that run at one of the two world sizes only), then checks
every job's prediction against its measurement. Ratios from one run, never a gate:
the targets are printed beside what was measured.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from experiments.plan.cluster import ROOT
from experiments.report.plan import check_summary, check_sweep, write_check

# (summary key, target, higher is better)
TARGETS = (("step_spearman", 0.9, True), ("step_mape", 0.15, False), ("memory_max_error", 0.10, False))


def main(argv: list[str]) -> int:
    if not (ROOT / "calibration" / "this_machine.json").is_file():
        subprocess.run([sys.executable, "-m", "experiments.report.calibrate"], cwd=ROOT, check=True)
    sweep = ROOT / "outputs" / "sweeps" / f"plan_bench_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    base = [sys.executable, "train.py", "-m", "experiment=plan_check", f"hydra.sweep.dir={sweep}"]
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    strategies = "ddp,zero1,zero2,zero3,tp,pp,mp" + (",deepspeed" if deepspeed else "")
    for world, only in (("1,2", strategies), ("1", "single"), ("2", "hsdp,fsdp_tp,ddp_pp")):
        sweep_args = [f"strategy={only}", f"launcher.nproc_per_node={world}", *argv]
        subprocess.run([*base, *sweep_args], cwd=ROOT, check=True)
    rows = check_sweep(sweep, [])
    print(write_check(sweep, rows))
    s = check_summary(rows)
    print()
    for key, target, higher in TARGETS:
        met = s[key] >= target if higher else s[key] <= target
        print(
            f"{key:<18} {s[key]:.3f}   target {'>=' if higher else '<='} {target:g}: {'met' if met else 'missed'}"
        )
    print(f"\nwrote {Path(sweep) / 'plan_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
