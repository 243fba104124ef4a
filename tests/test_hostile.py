"""Hostile input: every bad config is one line naming the key, exit code 2, no process started and
no directory left behind; faults found after launch are one line naming the cause and exit code 1.

The table runs `train.py`'s own entry point in this process (a pre-launch rejection starts no
process, so there is none to spawn): each case asserts what a user in a terminal would see.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from experiments.config.schema import typed_config
from tests.helpers import REPO, TINY
from tests.procs import children

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (train.py is a script at the repo root)


@dataclass(frozen=True)
class Bad:
    args: tuple[str, ...]
    names: str  # what the one line must name (the key, or the file)
    why: str = ""  # the category, for the test id

    def __str__(self) -> str:
        return self.why or " ".join(self.args)


GPT = ("model=transformer", "dataset=tokens")
LLAMA = ("model=llama", "dataset=tokens", "model.hidden=32", "model.heads=4", "model.kv_heads=2")
# Each category of issue 9, with more than its example.
TABLE = [
    # typos: a wrong option, key or value never runs the default experiment
    Bad(("experiment=doesnotexist",), "experiment/doesnotexist"),
    Bad(("experiment=zero_memroy",), "experiment/zero_memroy"),
    Bad(("+foo=1",), "foo"),
    Bad(("+train.foo=1",), "train.foo"),
    Bad(("train.stepz=3",), "train.stepz"),
    Bad(("strategy=nope",), "strategy/nope"),
    Bad(("~model",), "model has no value", "a deleted config group"),
    # numbers nobody checked
    Bad(("train.lr=nan",), "train.lr"),
    Bad(("train.lr=inf",), "train.lr"),
    Bad(("train.lr=-1",), "train.lr"),
    Bad(("train.momentum=-1",), "train.momentum"),
    Bad(("train.momentum=1.5",), "train.momentum"),
    Bad(("train.weight_decay=-1",), "train.weight_decay"),
    Bad(("train.grad_clip=inf",), "train.grad_clip"),
    Bad(("strategy.bucket_cap_mb=-1",), "strategy.bucket_cap_mb"),
    Bad(("dataset.input_shape=[0]",), "dataset.input_shape"),
    Bad(("dataset.input_shape=[-3]",), "dataset.input_shape"),
    Bad(("dataset.input_shape=[]",), "dataset.input_shape"),
    Bad(("seed=-1",), "seed"),
    Bad(("launcher.join_timeout_s=0",), "launcher.join_timeout_s"),
    Bad(("launcher.nproc_per_node=0",), "launcher.nproc_per_node=0 must be >= 1"),
    Bad(("launcher.nnodes=0",), "launcher.nnodes=0 must be >= 1"),
    Bad(("launcher.node_rank=-1",), "launcher.node_rank=-1 must be >= 0"),
    Bad(("launcher.node_rank=1",), "launcher.node_rank=1 must be in [0, launcher.nnodes=1)"),
    Bad(("launcher.max_restarts=-1",), "launcher.max_restarts=-1 must be >= 0"),
    Bad(("launcher.timeout_s=0",), "launcher.timeout_s=0 must be > 0"),
    Bad(("launcher.grace_s=-1",), "launcher.grace_s=-1 must be >= 0"),
    Bad(("launcher.gpus_per_node=-2",), "launcher.gpus_per_node=-2 must be >= -1"),
    # typed choices fail at compose time, as a wrong key does
    Bad(("strategy=fsdp", "strategy.mp_param_dtype=fp16"), "strategy.mp_param_dtype"),
    Bad(("train.precision=fp16",), "train.precision"),
    Bad(("train.optimizer=adam",), "train.optimizer"),
    Bad(("launcher.start_method=fork",), "launcher.start_method"),
    # keys the chosen strategy (model, dataset) does not use
    Bad(("strategy=ddp", "strategy.schedule=gpipe"), "strategy.schedule"),
    Bad(("strategy=ddp", "strategy.microbatches=8"), "strategy.microbatches"),
    Bad(("strategy=ddp", "strategy.tp=2"), "strategy.tp"),
    Bad(("strategy=tp", "strategy.tp=2", *GPT), "strategy.tp"),
    Bad(("strategy=fsdp", "strategy.bucket_cap_mb=1"), "strategy.bucket_cap_mb"),
    Bad(("strategy=ddp", "strategy.reshard_after_forward=false"), "strategy.reshard_after_forward"),
    Bad(("strategy=pp", "strategy.mp_reduce_dtype=bf16"), "strategy.mp_reduce_dtype"),
    Bad(
        ("strategy=single", "launcher=local", "strategy.gradient_as_bucket_view=true"), "strategy.gradient_as"
    ),
    Bad(("strategy=ps", "strategy.bucket_cap_mb=10"), "strategy.bucket_cap_mb"),
    Bad(("strategy=ps", "train.grad_clip=1"), "train.grad_clip"),
    Bad(("strategy=ps", "model=cnn", "model.norm=sync_batch"), "model.norm=sync_batch"),
    Bad(("strategy=pp", "model=cnn", "model.norm=sync_batch"), "model.norm=sync_batch"),
    # data that cannot work
    Bad(("dataset=cifar10", "model=cnn", "dataset.input_shape=[3,64,64]"), "dataset.input_shape"),
    # resources: ranks vs memory, model state vs memory
    Bad(("launcher.nproc_per_node=512", "train.global_batch_size=512"), "launcher.nproc_per_node"),
    Bad(("model.hidden=100000",), "model.hidden"),
    # rendezvous that cannot happen
    Bad(("launcher.nnodes=2", "launcher.rdzv_endpoint=no-such-host.invalid:29500"), "launcher.rdzv_endpoint"),
    Bad(("launcher.nnodes=2", "launcher.rdzv_endpoint=node0"), "launcher.rdzv_endpoint"),
    # path and script injection
    Bad(("launcher.rdzv_id=../../x",), "launcher.rdzv_id"),
    Bad(("launcher.nnodes=2", "launcher.rdzv_endpoint='host\nx:29500'"), "launcher.rdzv_endpoint"),
    # numbers in range for the table but not for what consumes them (timedelta, torch's timeouts)
    Bad(("launcher.timeout_s=100000000000000",), "launcher.timeout_s", "a timeout timedelta cannot hold"),
    Bad(("launcher.join_timeout_s=100000000000000",), "launcher.join_timeout_s", "a join timeout too long"),
    Bad(("launcher.grace_s=100000000000000",), "launcher.grace_s", "a grace too long"),
    # paths the OS cannot look up: each names its own key
    Bad(("train.resume=~nosuchuser/run",), "train.resume", "a home of no such user"),
    Bad(("dataset=mnist", "dataset.root=~nosuchuser/data"), "dataset.root", "a root in no such home"),
    Bad(
        ("dataset=tokens", "dataset.text_file=~nosuchuser/a.txt"),
        "dataset.text_file",
        "a text in no such home",
    ),
    Bad(("dataset=tokens", f"dataset.text_file={'a' * 5000}.txt"), "dataset.text_file", "a name too long"),
    # model shapes that cannot be split the way they are asked to
    Bad((*LLAMA, "model.kv_heads=3"), "model.kv_heads=3", "kv heads that do not divide the heads"),
    Bad((*LLAMA, "model.heads=8", "model.hidden=24"), "model.hidden", "an odd rotary head size"),
    Bad((*LLAMA, "strategy=tp", "launcher.nproc_per_node=4"), "model.kv_heads", "tp above the kv heads"),
    # Models (docs/models.md): each refusal names the key or what the model lacks.
    Bad(("model=torchvision", "dataset=fake_images", "model.arch=resnet9000"), "model.arch=resnet9000"),
    Bad(
        ("model=torchvision", "dataset=fake_images", "model.arch=vit_b_16", "strategy=tp"),
        "strategy=tp needs a TP plan; model=vit_b_16 declares none",
    ),
    Bad(
        ("model=torchvision", "dataset=fake_images", "model.arch=vit_b_16", "strategy=pp"),
        "model=vit_b_16 is not",
    ),
    Bad(
        ("model=torchvision", "dataset=fake_images", "model.arch=alexnet"),
        "fails on a batch of dataset=fake_images",
    ),
    Bad(("model=torchvision",), "needs images"),
    Bad(("model=moe", "dataset=tokens", "strategy=pp"), "auxiliary loss"),
    Bad(("model=moe", "dataset=tokens", "strategy=dp", "launcher=local"), "auxiliary loss"),
    Bad(("model=moe", "dataset=tokens", "model.top_k=5"), "model.top_k=5"),
    Bad(("model=moe", "dataset=tokens", "model.top_k=0"), "model.top_k=0"),
    Bad(("model=llama", "dataset=tokens", "model.heads=5"), "model.heads=5"),
    Bad(("model=llama",), "reads token windows"),
    Bad(("model=mlp", "dataset=tokens"), "classifies"),
    Bad(("model._target_=nowhere.Net",), "model._target_=nowhere.Net does not import"),
    Bad(("model.hidden=wide",), "model.hidden='wide' must be int"),
    Bad(("+model.hiddn=3",), "did you mean hidden?"),
    Bad(("+dataset.args.n=3",), "dataset.args"),
    # Numbers that pass a lower bound but break what consumes them.
    Bad(("dataset.num_workers=1000000",), "dataset.num_workers=1000000 must be <= 256"),
    Bad(("launcher.threads_per_rank=1000000",), "launcher.threads_per_rank=1000000 must be <= 1024"),
    Bad(("strategy.bucket_cap_mb=1e300",), "strategy.bucket_cap_mb=1e+300 must be <= 1e+06"),
    Bad(
        ("train.steps=100000000000000000000",),
        "train.steps=100000000000000000000 must be <= 9223372036854775807",
    ),
    Bad(("dataset.num_samples=1000000000000",), "dataset=synthetic holds ~"),
    Bad(("model.layers=100000000",), "model.layers=100000000 must be <= 10000"),
    Bad(("dataset.val_samples=1000000000000",), "lower dataset.num_samples or dataset.val_samples"),
    # HSDP
    Bad(("strategy=hsdp", "strategy.dp_replicate=3"), "dp_replicate=3 = 3 ranks, but the launcher gives 2"),
    # Where the time goes (issue 24)
    Bad(("train.memory_snapshot=true",), "train.memory_snapshot=true records CUDA allocations"),
    Bad(("train.profile=true", "train.profile_from=300"), "past train.steps=200"),
    Bad(("train.profile_steps=0",), "train.profile_steps"),
    # Context and expert parallelism (issue 22)
    Bad(("strategy=fsdp", "strategy.cp=2", *GPT, "dataset.seq_len=6"), "2·cp = 4 chunks"),
    Bad(("strategy=fsdp", "strategy.cp=2"), "model=mlp has none"),
    Bad(("strategy=fsdp", "strategy.cp=4", *GPT), "cp=4 = 4 ranks, but the launcher gives 2"),
    Bad(("strategy=ddp", "strategy.cp=2", *GPT), "does not use strategy.cp=2"),
    Bad(("strategy=fsdp", "strategy.cp=2", "train.compile=true", *GPT), "train.compile with strategy.cp"),
    Bad(
        ("strategy=fsdp", "strategy.ep=2", "model=moe", "dataset=tokens", "model.experts=3"),
        "does not divide model.experts=3",
    ),
    Bad(("strategy=fsdp", "strategy.ep=2", *LLAMA), "model=llama has none"),
    Bad(
        ("strategy=fsdp", "strategy.ep=4", "model=moe", "dataset=tokens"),
        "strategy.ep=4 must divide dp_shard = 2",
    ),
    Bad(("strategy=fsdp_tp", "strategy.ep=2", "model=moe", "dataset=tokens"), "does not use strategy.ep=2"),
    Bad(("strategy=fsdp", "strategy.cp=0", *GPT), "strategy.cp"),
    Bad(("strategy=fsdp", "strategy.dp_replicate=2"), "does not use strategy.dp_replicate"),
    Bad(("strategy=hsdp", "strategy.dp_replicate=0"), "strategy.dp_replicate"),
    # memory levers (issue 23)
    Bad(
        ("model.layers=2", "train.ac=full", "train.ac_every=3"),
        "train.ac_every=3 is more than the model's 2 blocks",
    ),
    Bad(("train.ac=some",), "train.ac"),
    Bad(("train.ac_every=0",), "train.ac_every"),
    Bad(("train.ac_every=2",), "train.ac_every=2 does nothing with train.ac=none"),
    Bad(
        ("model=torchvision", "model.arch=shufflenet_v2_x0_5", "dataset=fake_images", "train.ac=selective"),
        "declares none",
    ),
    Bad(
        (*LLAMA, "strategy=pp", "strategy.schedule=zbv", "train.ac=selective"),
        "train.ac=selective cannot run under strategy.schedule=zbv",
    ),
    Bad(
        ("strategy=dp", "launcher=local", "train.compile=true"),
        "train.compile=true cannot run under strategy=dp",
    ),
    Bad(("strategy=fsdp", "strategy.offload=true"), "strategy.offload=true"),
    Bad(("strategy=ddp", "strategy.offload=true"), "does not use strategy.offload"),
]


def cli(monkeypatch, capfd, *args: str) -> tuple[int, list[str]]:
    """`python train.py ARGS` in this process: (exit code, non-empty stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # what the user had; train.py sets its own
    capfd.readouterr()
    try:
        code = train.cli()
    except SystemExit as e:
        code = e.code
    return code, [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]


def rejected(monkeypatch, capfd, tmp_path: Path, *args: str) -> str:
    before = children(os.getpid())
    job = tmp_path / "job"
    code, lines = cli(monkeypatch, capfd, *args, f"hydra.run.dir={job}")
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("paralab: config error: "), lines
    assert not job.exists(), "a rejected job leaves no directory"
    assert children(os.getpid()) <= before, "a rejected job starts no process"
    return lines[0]


@pytest.mark.parametrize("bad", TABLE, ids=str)
def test_bad_input_is_one_line_naming_it_and_exit_2(bad, monkeypatch, capfd, tmp_path):
    line = rejected(monkeypatch, capfd, tmp_path, *bad.args)
    assert bad.names in line, line


def test_a_typo_in_a_groups_config_file_names_the_key_and_the_file(monkeypatch, capfd, tmp_path):
    """A user's own model config, found through hydra.searchpath, with a key its schema lacks."""
    conf = tmp_path / "my_project" / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "my_net.yaml").write_text("_target_: models.mlp.MLP\nname: mlp\nhiddn: 3\n")
    line = rejected(monkeypatch, capfd, tmp_path, f"hydra.searchpath=[file://{conf}]", "model=my_net")
    assert "model/my_net.yaml" in line and "model.hiddn" in line and "did you mean hidden?" in line, line


def _cifar(root: Path, corrupt: str = "") -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (8, 3072), dtype=np.uint8), "labels": list(range(8))}
        (base / name).write_bytes(b"not a pickle" if name == corrupt else pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root


def _mnist(root: Path, truncate: bool) -> Path:
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n = 64
    images = struct.pack(">IIII", 2051, n, 28, 28) + bytes(n * 28 * 28 - (100 if truncate else 0))
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(images)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(n))
    return root


def test_data_that_cannot_work_is_rejected_before_launch(monkeypatch, capfd, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    # One batch of windows (64 × 32 + 1 bytes), but not once the last tenth is held out.
    no_tail = tmp_path / "no_tail.txt"
    no_tail.write_text("x" * (64 * 32 + 1))
    cifar = _cifar(tmp_path / "cifar")  # exists, but fails the published checksums
    mnist = _mnist(tmp_path / "mnist", truncate=True)
    for args, names in [
        ((*GPT, f"dataset.text_file={empty}"), "holds 0 bytes"),
        ((*GPT, f"dataset.text_file={short}"), "holds 100 bytes"),
        ((*GPT, f"dataset.text_file={no_tail}"), "holds 2049 bytes: 57 training windows"),
        (("dataset=cifar10", "model=cnn", f"dataset.root={cifar}"), "data_batch_1 fails its published MD5"),
        (("dataset=mnist", "model=cnn", f"dataset.root={mnist}"), "truncated or corrupt"),
    ]:
        assert names in rejected(monkeypatch, capfd, tmp_path, *args)


@pytest.mark.parametrize("deepspeed_installed", [True, False], ids=["ds-installed", "ds-missing"])
def test_resuming_into_a_strategy_that_cannot_load_is_refused_before_launch(
    monkeypatch, capfd, tmp_path, deepspeed_installed
):
    from hydra import compose, initialize_config_dir

    import parallel.strategies.deepspeed
    from experiments.config.schema import save_frozen
    from experiments.train.checkpoint import COMPLETE, step_dir

    # The refusal is about the strategy, not about this machine: it reads the same with or without the extra.
    monkeypatch.setattr(parallel.strategies.deepspeed, "installed", lambda: deepspeed_installed)

    # A checkpoint only has to resolve: the refusal comes before anything reads it.
    source = tmp_path / "source"
    step_dir(source, 3).mkdir(parents=True)
    (step_dir(source, 3) / COMPLETE).touch()
    ds = ("strategy=deepspeed", "strategy.zero_stage=1")
    for resume in (source, step_dir(source, 3)):
        line = rejected(monkeypatch, capfd, tmp_path, *ds, f"train.resume={resume}")
        assert f"strategy=deepspeed cannot resume from a checkpoint yet (train.resume={resume}:" in line, line
    # The same job dir again (train.resume=auto): only the job dir says there is a checkpoint.
    args = [*TINY, *ds]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        save_frozen(compose("config", overrides=args), source)
    code, lines = cli(monkeypatch, capfd, *args, f"hydra.run.dir={source}")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("paralab: config error: strategy=deepspeed cannot resume"), lines
    assert f"train.resume={source} in a new hydra.run.dir" in lines[0], lines
    # Torch's strategies load it.

    from experiments.run.validate import validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        validate(typed_config(compose("config", overrides=[*TINY, f"train.resume={source}"])))


LOCAL = (*TINY, "strategy=single", "launcher=local")


def _shard(step: Path) -> Path:
    return next(step.glob("*.distcp"))


def test_a_resume_source_that_cannot_load_is_one_line_naming_what_differs(monkeypatch, capfd, tmp_path):
    source = tmp_path / "mlp"
    code, lines = cli(monkeypatch, capfd, *LOCAL, "train.steps=2", f"hydra.run.dir={source}")
    assert code == 0, lines
    # Another model's checkpoint: the first tensor this model has and it lacks.
    line = rejected(monkeypatch, capfd, tmp_path, *LOCAL, *GPT, "model.hidden=16", f"train.resume={source}")
    assert f"train.resume={source} cannot be loaded: it holds no stem.tok.weight" in line, line
    # The same model, wider: the first tensor of another shape.
    line = rejected(monkeypatch, capfd, tmp_path, *LOCAL, "model.hidden=24", f"train.resume={source}")
    assert "its stem.1.weight is [64, 8], this model's is [24, 8]" in line, line
    # A truncated shard: named, before launch.
    shard = _shard(source / "checkpoints" / "step_2")
    shard.write_bytes(shard.read_bytes()[:100])
    line = rejected(monkeypatch, capfd, tmp_path, *LOCAL, f"train.resume={source}")
    assert f"its shard {shard} is truncated (100 of" in line, line


def test_auto_resume_sets_an_unreadable_checkpoint_aside_and_takes_the_one_before(
    monkeypatch, capfd, tmp_path
):
    job = tmp_path / "job"
    args = (*LOCAL, "train.checkpoint_every=2", f"hydra.run.dir={job}")
    code, lines = cli(monkeypatch, capfd, *args, "train.steps=4")
    assert code == 0, lines
    step4 = job / "checkpoints" / "step_4"
    shard = _shard(step4)
    shard.write_bytes(shard.read_bytes()[:100])
    code, lines = cli(monkeypatch, capfd, *args, "train.steps=6")
    assert code == 0, lines
    assert any(
        line.startswith("paralab: checkpoint step_4 cannot be loaded (its shard")
        and "resuming from step_2" in line
        for line in lines
    ), lines
    assert (job / "checkpoints" / "step_4.unreadable").is_dir()  # set aside, nothing deleted
    record = json.loads((job / "metrics.json").read_text())
    assert record["resumes"][-1]["from_step"] == 2 and len(record["losses"]) == 6, record["resumes"]


def test_a_sweep_of_only_rejected_jobs_fails(monkeypatch, capfd, tmp_path):
    sweep = tmp_path / "sweep"
    code, lines = cli(
        monkeypatch, capfd, "-m", "strategy=single", "launcher.nproc_per_node=2,4", f"hydra.sweep.dir={sweep}"
    )
    assert code == 2, lines
    assert lines[-1] == "paralab: every job of the sweep (2) was rejected; nothing ran"
    assert not sweep.exists()


def test_a_rejected_job_leaves_an_existing_job_dir_as_it_was(monkeypatch, capfd, tmp_path):
    job = tmp_path / "job"
    (job / ".hydra").mkdir(parents=True)
    (job / "train.log").write_text("what the last run said\n")
    (job / ".hydra" / "config.yaml").write_text("the last run's config\n")
    code, lines = cli(monkeypatch, capfd, "train.lr=nan", f"hydra.run.dir={job}")
    assert code == 2 and len(lines) == 1, lines
    assert (job / "train.log").read_text() == "what the last run said\n"
    assert (job / ".hydra" / "config.yaml").read_text() == "the last run's config\n"
    assert sorted(p.name for p in (job / ".hydra").iterdir()) == ["config.yaml"]


def test_a_rerun_never_overwrites_results(monkeypatch, capfd, tmp_path):
    """Results it cannot tell the config of are refused; a run of the same config stopped before
    its first checkpoint starts again from step 0, what it wrote set aside, not overwritten."""
    from hydra import compose, initialize_config_dir

    from experiments.config.schema import save_frozen

    args = [*TINY, "strategy=single", "launcher=local"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=args)
    job = tmp_path / "job"
    (job / "tb" / "rank0").mkdir(parents=True)
    (job / "tb" / "rank0" / "events").write_text("the last run's curves")
    code, lines = cli(monkeypatch, capfd, *args, f"hydra.run.dir={job}")
    assert code == 2 and "holds tb but no config.resolved.yaml" in lines[-1], lines
    save_frozen(cfg, job)  # the same config, but no checkpoint to continue from
    code, lines = cli(monkeypatch, capfd, *args, f"hydra.run.dir={job}")
    assert code == 0, lines
    assert any("was stopped before its first checkpoint: starting it again from step 0" in ln for ln in lines)
    assert (job / "stopped_1" / "tb" / "rank0" / "events").read_text() == "the last run's curves"
    assert len(json.loads((job / "metrics.json").read_text())["losses"]) == 6


def test_no_network_for_a_download_is_one_line_and_exit_1(monkeypatch, capfd, tmp_path):
    # A proxy that refuses every connection: no network, on any machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, closed)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    job = tmp_path / "job"
    root = tmp_path / "root"
    code, lines = cli(
        monkeypatch,
        capfd,
        "dataset=mnist",
        "model=cnn",
        "dataset.download=true",
        f"dataset.root={root}",
        f"hydra.run.dir={job}",
    )
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("paralab: dataset=mnist: download into"), lines
    assert "no network here?" in lines[0]
    assert not job.exists()


# ---- After launch: one line naming the cause, exit code 1, no process left. ----


def _left_in_group(pgid: int) -> set[int]:
    """Live processes of process group `pgid` (everything train.py started, orphans included)."""
    left = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            left.add(int(entry))
    return left


def _run(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[int, list[str], set[int]]:
    """`python train.py ARGS` in a session of its own: (exit code, stderr lines, what is left of it)."""
    from tests.test_faults import job

    with job(tmp_path, *args) as j:
        code, err, _ = j.finish(timeout)
        end = time.monotonic() + 10  # "within seconds", as test_faults allows ranks
        while (left := _left_in_group(j.proc.pid)) and time.monotonic() < end:
            time.sleep(0.1)
    return code, [ln for ln in err.splitlines() if ln.strip()], left


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(["launcher.nproc_per_node=1"], marks=pytest.mark.full),
        ["strategy=single", "launcher=local"],
    ],
)
def test_a_corrupt_file_found_by_the_ranks_is_one_line_and_exit_1(tmp_path, launcher):
    # With checksums off nothing checks the files before launch: the ranks find the bad one.
    root = _cifar(tmp_path / "cifar", corrupt="data_batch_3")
    code, lines, left = _run(
        tmp_path,
        *launcher,
        "dataset=cifar10",
        "model=cnn",
        f"dataset.root={root}",
        "dataset.verify_checksums=false",
        "dataset.input_shape=[3,32,32]",
        "train.global_batch_size=8",
    )
    assert code == 1, lines
    assert lines[-1].startswith("paralab: rank 0 failed (exit code 1)"), lines
    assert "UnpicklingError" in lines[-1] and "Traceback" not in "\n".join(lines)
    assert not left


def test_a_missing_node_is_waited_for_out_loud_then_one_line_and_exit_1(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    code, lines, left = _run(
        tmp_path, "launcher.nnodes=2", f"launcher.rdzv_endpoint={endpoint}", "launcher.join_timeout_s=3"
    )
    assert code == 1, lines
    assert any(f"waiting for all 2 nodes (launcher.nnodes) to join at {endpoint}" in ln for ln in lines), (
        lines
    )
    assert lines[-1] == (
        f"paralab: node 0: not all 2 nodes joined at {endpoint} within launcher.join_timeout_s=3; "
        "start the same command on every node"
    )
    assert not left


def _non_loopback_addresses() -> list[str]:
    import fcntl
    import struct

    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(
                    s.fileno(), 0x8915, struct.pack("256s", name[:15].encode())
                )  # SIOCGIFADDR
            except OSError:
                continue
            addr = socket.inet_ntoa(packed[20:24])
            if not addr.startswith("127."):
                found.append(addr)
    return found


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on, from /proc."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:  # LISTEN
                    hexaddr, port = local.split(":")
                    raw = bytes.fromhex(hexaddr)
                    # /proc prints each 32-bit word in host (little-endian) order
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    family = socket.AF_INET if width == 4 else socket.AF_INET6
                    found.append((socket.inet_ntop(family, raw), int(port, 16)))
    return found


@pytest.mark.parametrize(
    "overrides",
    [
        ("launcher=torchrun",),
        # RPC brings its own store and TensorPipe's listeners.
        ("launcher=torchrun", "strategy=ps"),
        pytest.param(("launcher=spawn",), marks=pytest.mark.full),
    ],
    ids=["torchrun", "torchrun-ps", "spawn"],
)
def test_a_single_node_job_listens_on_loopback_only(tmp_path, overrides):
    import ipaddress

    from tests.test_faults import job

    others = _non_loopback_addresses()
    if not others:
        pytest.skip("this machine has no non-loopback address to connect from")
    with job(tmp_path, *overrides) as j:
        j.ranks()
        listening = _listening(j.descendants() | {j.proc.pid})
        assert listening, "the ranks' store listens somewhere"
        for addr, port in listening:
            assert ipaddress.ip_address(addr).is_loopback, (addr, port, listening)
            for other in others:
                with (
                    pytest.raises(ConnectionRefusedError),
                    socket.create_connection((other, port), timeout=5),
                ):
                    pass
