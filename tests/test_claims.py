"""README claims that had no test: --help, the experiment presets, the spawn start method, what
TensorBoard holds, sampled steps left out of throughput, `make parity`'s exit code, checkpoints
loaded at another world size, and two torchrun agents on one machine forming one job."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from experiments.config.schema import DatasetConfig, LauncherConfig, StrategyConfig, TrainConfig, typed_config
from experiments.report.parity import compose_config, run_case
from parallel.strategies.deepspeed import installed as deepspeed_installed
from tests.helpers import REPO, TINY, SharedJobs, child_env, run, start_agents, tb_scalars

GROUPS = {
    "strategy": StrategyConfig,
    "dataset": DatasetConfig,
    "launcher": LauncherConfig,
    "train": TrainConfig,
}
PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
# Presets that sweep a grid with Hydra's basic sweeper; lr_search (Optuna) is tested in test_eval.py.
GRIDS = [
    p for p in PRESETS if "hydra/sweeper" not in (REPO / "conf" / "experiment" / f"{p}.yaml").read_text()
]
GPT_TINY = [
    "model=transformer",
    "dataset=tokens",
    "model.hidden=16",
    "model.heads=2",
    "model.layers=2",
    "dataset.seq_len=8",
    "dataset.vocab_size=16",
]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Jobs run once per session through run_case (torchrun agent, forkserver ranks), keyed by config."""
    shared = SharedJobs(tmp_path_factory, "claims")

    def job(*overrides: str) -> tuple[dict, Path]:
        return shared.get(list(overrides), run_case)

    return job


def python(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout
    )


def tb_steps(run_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---- 1. --help ----


def help_config(stdout: str) -> dict:
    """The YAML block Hydra prints under '== Config ==' (between its intro line and the footer)."""
    block = stdout.split("== Config ==", 1)[1].split("\n", 2)[2]
    block = block.split("Strategies, launchers and every key", 1)[0]
    return yaml.safe_load(block)


def test_help_lists_every_group_and_every_key_with_its_default():
    proc = run(["--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # Every option of every config group is listed.
    for group in ("strategy", "model", "dataset", "launcher", "experiment"):
        options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        line = next((ln for ln in out.splitlines() if ln.startswith(f"{group}: ")), None)
        assert line is not None, f"group {group} missing from --help"
        assert line.removeprefix(f"{group}: ").split(", ") == options, line
    shown = help_config(out)
    missing = [
        f"{group}.{f.name}"
        for group, schema in GROUPS.items()
        for f in dataclasses.fields(schema)
        if f.name not in (shown.get(group) or {})
    ]
    missing += [] if "seed" in shown else ["seed"]
    assert not missing, f"keys of experiments/config/schema.py missing from --help: {missing}"
    # ... each with the default a run without overrides gets.
    composed = OmegaConf.to_container(compose_config([]), resolve=True)
    composed.pop("hydra", None)
    assert shown == composed


# ---- 2. experiment presets as sweeps ----


def sweep_params(preset: str) -> dict[str, list[str]]:
    conf = OmegaConf.load(REPO / "conf" / "experiment" / f"{preset}.yaml")
    return {k: str(v).split(",") for k, v in conf.hydra.sweeper.params.items()}


def installed_only(params: dict[str, list[str]]) -> dict[str, list[str]]:
    """Without the deepspeed extra its sweep jobs are skipped with a config error: leave them out."""
    if "strategy" not in params or deepspeed_installed():
        return {}
    return {"strategy": [s for s in params["strategy"] if not s.startswith("deepspeed")]}


def run_preset(preset: str, sweep_dir: Path, narrowed: dict[str, list[str]]) -> None:
    narrowed = {**installed_only(sweep_params(preset)), **narrowed}
    params = {**sweep_params(preset), **narrowed}
    expected = math.prod(len(v) for v in params.values())
    proc = run(
        [
            "-m",
            f"experiment={preset}",
            "train.steps=3",
            *(f"{k}={','.join(v)}" for k, v in narrowed.items()),
            f"hydra.sweep.dir={sweep_dir}",
        ],
        timeout=900,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "config error" not in proc.stderr, proc.stderr[-3000:]
    assert "skipped job" not in proc.stderr, proc.stderr[-3000:]
    job_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(job_dirs) == expected, [p.name for p in job_dirs]
    for job in job_dirs:
        m = json.loads((job / "metrics.json").read_text())
        assert len(m["losses"]) == 3 and all(math.isfinite(v) for v in m["losses"]), (job.name, m["losses"])
        for key, values in params.items():
            # The job dir is named from the swept overrides, one of each key's values.
            assert any(f"{key}={v}" in job.name.split(",") for v in values), (job.name, key)


# Presets whose jobs are heavier run one job in make test (the whole grid in make test-full).
NARROWER = {
    "memory_levers": {"strategy": ["ddp"], "train.ac": ["selective"]},
    "hsdp": {"strategy.dp_replicate": ["2"]},
    "context_scaling": {"dataset.seq_len": ["128"]},
    "pipeline_bubble": {"strategy.schedule": ["1f1b"], "strategy.microbatches": ["4"]},
    "zero_memory": {"strategy": ["zero3"]},
    "scaling": {"strategy": ["fsdp"]},
    "expert_scaling": {"model.experts": ["4"], "strategy.ep": ["2"]},
}


# Presets whose every part make test already trains elsewhere (hsdp: its parity, communication
# and memory cases; plan_check: Llama under every strategy, and the advisor's prediction in the
# communication matrix) sweep in make test-full only.
FULL_ONLY = {"hsdp", "plan_check"}


@pytest.mark.parametrize(
    "preset", [pytest.param(p, marks=pytest.mark.full) if p in FULL_ONLY else p for p in GRIDS]
)
def test_experiment_preset_sweeps_at_two_ranks(tmp_path, preset):
    """Every preset as a sweep, at one world size (2 ranks: one core each here), over the first two
    values of each swept key: a grid of its own kind, each job named from its overrides."""
    params = {**sweep_params(preset), **installed_only(sweep_params(preset))}
    narrowed = {k: v[:2] for k, v in params.items()}
    narrowed.update(NARROWER.get(preset, {}))
    if "launcher.nproc_per_node" in params:
        narrowed["launcher.nproc_per_node"] = ["2"]
    run_preset(preset, tmp_path / "sweep", narrowed)


@pytest.mark.full
@pytest.mark.parametrize("preset", GRIDS)
def test_experiment_preset_full_sweep(tmp_path, preset):
    """Every job of the preset's sweep."""
    run_preset(preset, tmp_path / "sweep", {})


# ---- 3. start method ----


# make test-full: make test starts ranks both ways already (test_faults, test_launch).
@pytest.mark.full
def test_spawn_start_method_trains_the_same_losses_as_forkserver(jobs):
    base = ("strategy=ddp", "launcher=torchrun", "launcher.nproc_per_node=2", *TINY)
    fork, _ = jobs(*base)
    spawn, spawn_job = jobs(*base, "launcher.start_method=spawn")
    assert spawn["world_size"] == 2 and len(spawn["losses"]) == 6
    assert len(list((spawn_job / "tb").glob("rank*"))) == 2
    assert spawn["losses"] == pytest.approx(fork["losses"], rel=1e-6)
    assert spawn["grad_norms"] == pytest.approx(fork["grad_norms"], rel=1e-6)
    frozen = OmegaConf.load(spawn_job / "config.resolved.yaml")
    assert frozen.launcher.start_method == "spawn"


# ---- 4. TensorBoard ----


def test_sampled_run_writes_mem_comm_theory_on_every_rank_and_an_hparams_entry(jobs):
    m, job = jobs("strategy=ddp", "launcher=torchrun", "launcher.nproc_per_node=2", *TINY)
    for r in range(2):
        tags = tb_scalars(job / "tb" / f"rank{r}").keys()
        for prefix in ("mem/", "comm/", "theory/"):
            assert any(t.startswith(prefix) for t in tags), (r, prefix, sorted(tags))
        assert {"mem/model_state_bytes", "theory/mem/model_state_bytes", "comm/all_reduce_bytes"} <= tags

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(job / "tb" / "hparams"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    hp = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["strategy"].string_value == "ddp"
    assert start.session_start_info.hparams["world_size"].number_value == 2
    assert "_hparams_/experiment" in hp
    assert "custom_scalars__config__" in acc.PluginTagToContent("custom_scalars")
    layout = layout_pb2.Layout.FromString(
        acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    charted = {tag for cat in layout.category for chart in cat.chart for tag in chart.multiline.tag}
    assert {"loss/train", "perf/samples_per_s", "pipeline/bubble_fraction"} <= charted
    assert acc.Scalars("hparam/final_loss")[0].value == pytest.approx(m["final_loss"], rel=1e-6)


def test_pipeline_run_writes_bubble_and_its_theory_on_every_rank(jobs):
    _, job = jobs("strategy=pp", "launcher=torchrun", "launcher.nproc_per_node=2", *TINY, *GPT_TINY)
    for r in range(2):
        tags = tb_scalars(job / "tb" / f"rank{r}").keys()
        assert {"pipeline/bubble_fraction", "pipeline/busy_s", "theory/pipeline/bubble_fraction"} <= tags, (
            r,
            sorted(tags),
        )


# ---- 5. sampled steps are left out of throughput ----


def expected_perf_steps(steps: int, log_every: int, measure_every: int) -> list[int]:
    """Log steps whose interval holds a clean step: not step 1, not step 3, not a multiple of measure_every."""

    def sampled(s: int) -> bool:
        return measure_every > 0 and (s == min(3, steps) or s % measure_every == 0)

    logs = [s for s in range(1, steps + 1) if s % log_every == 0 or s == steps]
    out, first = [], 1
    for log in logs:
        if any(s > 1 and not sampled(s) for s in range(first, log + 1)):
            out.append(log)
        first = log + 1
    return out


@pytest.mark.parametrize(("measure_every", "perf_steps"), [(0, [2, 4, 6]), (2, [6]), (1, [])])
def test_sampled_steps_are_left_out_of_throughput(jobs, measure_every, perf_steps):
    # TINY: 6 steps, a log step every 2. measure_every=2 samples steps 2, 3, 4, 6: only step 5 is clean.
    assert expected_perf_steps(6, 2, measure_every) == perf_steps
    m, job = jobs(
        "strategy=ddp",
        "launcher=torchrun",
        "launcher.nproc_per_node=2",
        *TINY,
        f"train.measure_every={measure_every}",
    )
    sampled = [s for s in range(1, 7) if measure_every and (s == 3 or s % measure_every == 0)]
    for r in range(2):
        steps = tb_steps(job / "tb" / f"rank{r}")
        assert steps.get("perf/step_time_s", []) == perf_steps, (r, steps.get("perf/step_time_s"))
        assert steps.get("perf/samples_per_s", []) == perf_steps
        assert steps["perf/timing_meaningful"] == [2, 4, 6]  # every log step, clean steps or not
        assert steps.get("mem/model_state_bytes", []) == sampled, (r, steps.get("mem/model_state_bytes"))
    if perf_steps:
        assert math.isfinite(m["step_time_s"]) and m["step_time_s"] > 0
        assert m["samples_per_s"] == pytest.approx(16 / m["step_time_s"])
        step_times = tb_scalars(job / "tb" / "rank0")["perf/step_time_s"]
        # metrics.json: the median over log intervals of the clean steps' mean time.
        assert m["step_time_s"] == pytest.approx(sorted(step_times)[len(step_times) // 2], rel=1e-6)
    else:
        # No clean step at all: nothing to report, rather than a sampled step's time.
        assert math.isnan(m["step_time_s"]) and math.isnan(m["samples_per_s"]), m


# ---- 6. make parity ----


def parity(*overrides: str) -> subprocess.CompletedProcess:
    return python(["-m", "experiments.report.parity", *overrides], timeout=400)


def test_parity_exits_1_on_a_real_mismatch():
    # Plain BatchNorm: statistics per rank, so 2-rank DDP does not compute one process's loss.
    proc = parity(
        "strategy=ddp",
        "launcher.nproc_per_node=2",
        "model=cnn",
        "model.norm=batch",
        "model.channels=4",
        "dataset=fake_images",
        "dataset.input_shape=[3,16,16]",
        "dataset.num_samples=32",
        "train.global_batch_size=8",
        "train.steps=3",
        "train.lr=0.01",
    )
    assert proc.returncode == 1, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "MISMATCH: ddp on 2 ranks" in proc.stdout, proc.stdout


# make test-full: the tool's OK path is each parity case's own; its exit 1 stays in make test.
@pytest.mark.full
def test_parity_exits_0_when_the_setting_matches():
    proc = parity("strategy=ddp", "launcher.nproc_per_node=2", *TINY)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "OK: ddp on 2 ranks" in proc.stdout and "MISMATCH" not in proc.stdout, proc.stdout


# ---- 7. checkpoints load at another world size ----


# make test-full: resharded resume at another world size stays in make test (test_resume).
@pytest.mark.full
def test_fsdp_checkpoint_from_4_ranks_loads_into_fsdp_on_2_ranks(jobs, tmp_path):
    from data import dataset_spec
    from experiments.train.checkpoint import complete_checkpoints, load_full_model_state
    from models import build_model

    def fresh_model(overrides: list[str]):
        cfg = typed_config(compose_config(overrides))
        return build_model(cfg.model, dataset_spec(cfg.dataset))

    # Every run ends with a checkpoint (train.checkpoint_every=0: only the final one).
    overrides = ["strategy=fsdp", "launcher=torchrun", "launcher.nproc_per_node=4", *TINY]
    m, job = jobs(*overrides)
    assert m["world_size"] == 4 and m["degrees"]["dp_shard"] == 4
    found = complete_checkpoints(job)
    assert found and found[-1][0] == 6, found
    out = tmp_path / "loaded.pt"
    proc = python(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tests.claims_helpers",
            str(job),
            str(found[-1][1]),
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    loaded = torch.load(out, weights_only=True)
    assert loaded["world"] == 2
    # Really sharded at 2: rank 0 holds the first half (rounded up) of every parameter's dim 0.
    full = loaded["full"]
    halves = {k: (-(-v.shape[0] // 2),) + tuple(v.shape[1:]) for k, v in full.items()}
    assert loaded["local_shapes"] == halves
    one_process = load_full_model_state(job, fresh_model(overrides))
    assert full.keys() == one_process.keys()
    for k, v in one_process.items():
        assert torch.equal(full[k], v), k
    # ... and those are the trained weights, not a fresh initialisation.
    init = fresh_model(overrides).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in one_process.items())


# ---- 8. two torchrun agents on one machine, one 4-rank job ----


def wait_all_or_stop(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr). As soon as one fails, or at the timeout, the others are
    stopped: an agent whose peer is gone would wait in the rendezvous for its join timeout."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(len(procs)) as pool:
        futures = [pool.submit(p.communicate) for p in procs]
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                if not done or any(p.returncode not in (None, 0) for p in procs):
                    break
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.kill()
        return [f.result() for f in futures]


def test_two_torchrun_agents_form_one_four_rank_job(jobs, tmp_path):
    """The README's multi-node recipe, both "nodes" on this machine: one rendezvous, one job dir.

    With the c10d rendezvous, global ranks follow the order in which agents join, not
    launcher.node_rank: either agent may hold rank 0 (and write metrics.json)."""
    job = tmp_path / "job"
    agents = start_agents([job, job])
    outputs = wait_all_or_stop(agents, timeout=240)
    for n, (a, (out, err)) in enumerate(zip(agents, outputs, strict=True)):
        assert a.returncode == 0, f"agent node_rank={n} exited {a.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
    m = json.loads((job / "metrics.json").read_text())
    assert m["world_size"] == 4 and m["degrees"]["dp_replicate"] == 4
    assert sorted(p.name for p in (job / "tb").glob("rank*")) == ["rank0", "rank1", "rank2", "rank3"]
    single_node, _ = jobs("strategy=ddp", "launcher=torchrun", "launcher.nproc_per_node=4", *TINY)
    assert m["losses"] == pytest.approx(single_node["losses"], rel=1e-6)
    log = (job / "train.log").read_text()
    assert all(f"[rank{r}]" in log for r in range(4))
