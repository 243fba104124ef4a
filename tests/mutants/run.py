"""Run test selections under deliberately broken implementations; fail unless every one is caught.

    python -m tests.mutants.run [--only NAME ...] [--all] [--skip-control] [--list]

Each mutant (tests/mutants/sitecustomize.py) breaks one thing paralab promises. It is injected
into every process of a pytest run (pytest, torchrun's agent, the forkserver and the ranks) through
`PYTHONPATH=tests/mutants:<repo>` and `PARALAB_MUTANT=<name>`; no project file is touched. A
mutant is CAUGHT when its selection fails (pytest exit 1) and the trace shows that the broken code
really ran; it SURVIVED when the selection passes (or fails without ever running the mutant). First,
as a control, the union of the selections runs without a mutant and must pass.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

PARITY = "tests/test_parity.py::test_matches_single_process"
COMM = "tests/test_measure.py::test_communication_is_exactly_the_strategys_own"
MEMORY = "tests/test_measure.py::test_model_state_memory_matches_theory"
INDEPENDENT = "tests/test_independent.py"
AC = "tests/test_parity.py::test_activation_checkpointing_is_the_same_run"
ACTIVATIONS = "tests/test_memory.py::test_measured_activation_bytes_are_the_predicted_ones"


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str
    # Node ids, fnmatch patterns allowed ([ and ] are literal). With -x the first failure ends the
    # run, so the cheapest likely catcher comes first.
    selection: tuple[str, ...]


MUTANTS = [
    Mutant(
        "tp_noop",
        "tensor parallelism shards nothing (parallelize_module returns the module)",
        (f"{COMM}[tp-ws2-mlp-*]", f"{PARITY}[tp-ws2-gpt]"),
    ),
    Mutant(
        "ddp_sync_every_microstep",
        "DDP no_sync is a null context: gradients all-reduced on every micro-step",
        (f"{COMM}[ddp-ws2-accum-*]",),
    ),
    Mutant(
        "autocast_ignored",
        "torch.autocast, as StrategyContext.autocast calls it, does nothing",
        (f"{PARITY}[zero3-ws2-gpt-precision=bf16]",),
    ),
    Mutant(
        "fsdp_full_params",
        "fully_shard keeps full parameters (and syncs no gradient)",
        (f"{MEMORY}[zero3-2]", f"{PARITY}[zero3-ws2-mlp]"),
    ),
    Mutant(
        "pp_wrong_blocks",
        "pipeline stages get the block groups in reverse order",
        (f"{PARITY}[pp-ws2-mlp]",),
    ),
    Mutant(
        "zero1_unsharded",
        "ZeRO-1 builds a plain optimizer: full optimizer state on every rank",
        (
            f"{COMM}[zero1-ws2-*]",
            "tests/test_measure.py::test_zero1_state_follows_the_optimizer_assignment",
            f"{PARITY}[zero1-ws2-mlp]",  # the layout check: each rank steps a share of the parameters
        ),
    ),
    Mutant(
        "sampler_same_samples",
        "ShardedBatchSampler gives every data-parallel rank the first slice",
        (
            "tests/test_data.py::test_ranks_together_see_exactly_the_single_process_batches[2]",
            f"{PARITY}[ddp-ws2-mlp]",
        ),
    ),
    # Shared pieces: the reference run shares them, so only the independent checks can catch these.
    Mutant(
        "lr_warmup_off_by_one",
        "warmup starts at lr 0 and reaches the peak a step late",
        (
            f"{INDEPENDENT}::test_the_optimizer_that_steps_sees_the_schedules_closed_form_lr[constant-3-single]",
        ),
    ),
    Mutant(
        "adamw_coupled_decay",
        "train.optimizer=adamw builds Adam: weight decay coupled into the gradient",
        (f"{INDEPENDENT}::test_each_optimizer_step_is_the_update_computed_by_hand[adamw]",),
    ),
    Mutant(
        "loss_label_smoothing",
        "the training loss smooths its labels (0.1)",
        (f"{INDEPENDENT}::test_the_training_loss_is_cross_entropy_by_hand[*]",),
    ),
    Mutant(
        "clip_without_sqrt",
        "clipping divides the bound by the squared norm",
        (f"{INDEPENDENT}::test_clipping_scales_to_the_threshold_only_above_it[below-every-norm]",),
    ),
    Mutant(
        "sampler_no_reshuffle",
        "every epoch deals the first epoch's permutation",
        (f"{INDEPENDENT}::test_the_sampler_deals_the_documented_permutation_and_resumes_exactly[2]",),
    ),
    Mutant(
        "eval_counts_padding",
        "the held-out metrics count the filler rows of the last batch",
        (f"{INDEPENDENT}::test_held_out_accuracy_is_a_hand_count",),
    ),
    # Models: the mixture of experts' load-balancing loss.
    Mutant(
        "moe_aux_over_batch",
        "the load-balancing loss is taken over each rank's batch, not per sample",
        (
            f"{INDEPENDENT}::test_the_mixture_of_experts_is_the_routing_computed_by_hand[2]",
            f"{PARITY}[ddp-ws2-moe]",
        ),
    ),
    Mutant(
        "moe_aux_dropped",
        "the load-balancing loss is logged but never added to the loss",
        (f"{INDEPENDENT}::test_the_training_loss_of_a_mixture_adds_its_load_balancing_loss",),
    ),
    Mutant(
        "hsdp_whole_world",
        "HSDP shards over every data rank: plain FSDP, no replica groups",
        (f"{COMM}[hsdp-ws4-*]", f"{PARITY}[hsdp-ws4-mlp]"),
    ),
    Mutant(
        "cp_whole_sequence",
        "context parallelism gives every rank the whole sequence",
        (f"{COMM}[fsdp-cp2-ws4-gpt-*]", f"{PARITY}[fsdp-ws4-gpt-cp=2]"),
    ),
    Mutant(
        "plan_ignores_tp",
        "the advisor predicts a TP rank's memory as if it held every weight whole",
        (f"{COMM}[tp-ws2-mlp-*]",),
    ),
    Mutant(
        "ep_every_expert",
        "expert parallelism keeps every expert on every rank",
        (f"{COMM}[fsdp-ep2-ws4-moe-*]", f"{PARITY}[fsdp-ws4-moe-ep=2]"),
    ),
    Mutant(
        "ac_noop",
        "activation checkpointing names its blocks but checkpoints none (still the same run)",
        (f"{AC}[ddp-ws2-llama-ac=full-ac_every=2]",),
    ),
    Mutant(
        "ac_selective_keeps_nothing",
        "selective AC's policy recomputes every op: full AC in all but name",
        (f"{ACTIVATIONS}[llama-selective-fp32]", f"{AC}[fsdp-ws2-llama-ac=selective]"),
    ),
    Mutant(
        "activations_count_params",
        "the activation count includes the weights layers keep for backward",
        (f"{ACTIVATIONS}[llama-none-fp32]",),
    ),
]
TIMEOUT_S = 1200


def env_for(mutant: str | None, trace: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    for k in ("PARALAB_MUTANT", "PARALAB_MUTANT_TRACE"):
        env.pop(k, None)
    env["COLUMNS"] = "250"  # pytest's short summary keeps the first line of each failure
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(REPO), env.get("PYTHONPATH")) if p)
    if mutant:
        env["PARALAB_MUTANT"] = mutant
    if trace:
        env["PARALAB_MUTANT_TRACE"] = str(trace)
    return env


def pytest(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out + f"\ntimed out after {TIMEOUT_S}s", "")


def collect(files: list[str]) -> list[str]:
    proc = pytest(["--collect-only", *files], env_for(None, None))
    if proc.returncode != 0:
        sys.exit(f"mutants: collecting {files} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [line for line in proc.stdout.splitlines() if "::" in line]


def expand(pattern: str, ids: list[str]) -> list[str]:
    glob = "".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in pattern)  # brackets are literal
    found = [i for i in ids if fnmatch.fnmatchcase(i, glob)]
    if not found:
        sys.exit(f"mutants: no collected test matches {pattern}")
    return found


def failures(out: str) -> list[str]:
    """`FAILED <id> - <first line>` from pytest's short summary."""
    return [line for line in out.splitlines() if re.match(r"(FAILED|ERROR) \S+::", line)]


def hits(trace: Path) -> tuple[int, set[str]]:
    """Processes in which the mutant's broken code ran, and what ran."""
    if not trace.exists():
        return 0, set()
    pids, what = set(), set()
    for line in trace.read_text().splitlines():
        pid, _, event, *rest = line.split()
        if event == "hit":
            pids.add(pid)
            what.update(rest)
    return len(pids), what


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only", action="append", choices=[m.name for m in MUTANTS], help="run this mutant (repeatable)"
    )
    p.add_argument(
        "--all", action="store_true", help="run each whole selection (no -x): report every catching test"
    )
    p.add_argument("--skip-control", action="store_true", help="skip the un-mutated control run")
    p.add_argument("--list", action="store_true", help="print the table and exit")
    a = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.only or m.name in a.only]
    if a.list:
        for m in chosen:
            print(f"{m.name:<26} {m.breaks}")
            for s in m.selection:
                print(f"{'':<28}{s}")
        return 0

    files = sorted({s.split("::")[0] for m in chosen for s in m.selection})
    ids = collect(files)
    selections = {m.name: [i for s in m.selection for i in expand(s, ids)] for m in chosen}
    bad = 0

    if not a.skip_control:
        union = list(dict.fromkeys(i for sel in selections.values() for i in sel))
        t0 = time.perf_counter()
        proc = pytest(union, env_for(None, None))
        secs = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"CONTROL FAILED ({proc.returncode}) in {secs:.0f}s: the un-mutated selection must pass")
            print("\n".join(failures(proc.stdout)) or proc.stdout[-3000:] + proc.stderr[-3000:])
            return 1
        print(f"control   passed: {len(union)} tests without a mutant in {secs:.0f}s", flush=True)

    caught = survived = 0
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix=f"paralab-mutant-{m.name}-") as tmp:
            trace = Path(tmp) / "trace"
            t0 = time.perf_counter()
            proc = pytest([*([] if a.all else ["-x"]), *selections[m.name]], env_for(m.name, trace))
            secs = time.perf_counter() - t0
            n_hit, what = hits(trace)
        failed = failures(proc.stdout)
        if proc.returncode == 1 and n_hit:
            caught += 1
            verdict = "CAUGHT  "
        elif proc.returncode in (0, 1):
            survived += 1
            verdict = "SURVIVED"
        else:  # interrupted, internal or usage error, timeout: not a verdict on the mutant
            bad += 1
            verdict = f"ERROR {proc.returncode}"
        print(
            f"{verdict} {m.name:<26} {secs:5.0f}s  ran in {n_hit} process(es)"
            f"{' (' + ', '.join(sorted(what)) + ')' if what else ''}; selection: {' '.join(m.selection)}"
        )
        for line in failed:
            print(f"           {line[:300]}")
        if proc.returncode == 1 and not n_hit:
            print("           (the selection failed, but the mutant never ran: not a catch)")
        if verdict.startswith("ERROR"):
            print(proc.stdout[-2000:] + proc.stderr[-2000:])
        sys.stdout.flush()
    print(f"{caught} caught, {survived} survived" + (f", {bad} errored" if bad else ""))
    return 1 if survived or bad else 0


if __name__ == "__main__":
    sys.exit(main())
