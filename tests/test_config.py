"""Composition through Hydra's compose API, and the rules checked before any process starts."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from experiments.config.schema import Config, ConfigError, register_configs, typed_config
from experiments.run.validate import validate
from tests.helpers import REPO, run

register_configs()


def cfg_of(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return typed_config(compose("config", overrides=list(overrides)))  # type: ignore[return-value]


def test_default_composes_to_ddp_on_two_torchrun_ranks():
    cfg = cfg_of()
    assert (cfg.strategy.name, cfg.model.name, cfg.dataset.name, cfg.launcher.name) == (
        "ddp",
        "mlp",
        "synthetic",
        "torchrun",
    )
    assert cfg.launcher.nproc_per_node == 2
    assert validate(cfg).dp_replicate == 2


@pytest.mark.parametrize("override", ["train.stepz=3", "launcher.nproc=2", "strategy.bucket_cap=1"])
def test_unknown_key_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException):
        cfg_of(override)


@pytest.mark.parametrize(
    "override", ["train.steps=many", "train.optimizer=adam", "strategy.mp_param_dtype=fp16"]
)
def test_wrong_type_or_choice_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException):
        cfg_of(override)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=single"], "runs in one process"),
        (["launcher.nproc_per_node=0"], "launcher.nproc_per_node=0 must be >= 1"),
        (["train.global_batch_size=15"], "not divisible"),
        (["train.global_batch_size=16", "train.grad_accum_steps=3"], "not divisible"),
        (["launcher=local", "launcher.nproc_per_node=2"], "launcher=local runs one process"),
        (["launcher=spawn", "launcher.nnodes=2"], "single-node"),
        (["launcher.nnodes=2"], "rdzv_endpoint"),
        (
            ["dataset=mnist", "dataset.root=/nonexistent"],
            "/nonexistent/MNIST/raw/train-images-idx3-ubyte not found",
        ),
        (["model=cnn"], "needs images"),
        (["strategy.name=nope"], "unknown strategy 'nope'"),
        (["strategy=deepspeed", "strategy.zero_stage=4"], "strategy.zero_stage=4 is not one of: 1, 2, 3"),
        (["train.measure_every=-1"], "train.measure_every=-1 must be >= 0"),
        (["launcher.threads_per_rank=-2"], "launcher.threads_per_rank=-2 must be >= 0"),
        (["model.layers=0"], "model.layers=0 must be >= 1"),
        (["model=transformer", "dataset=tokens", "model.hidden=30"], "not divisible by model.heads=4"),
    ],
)
def test_validation_rejects(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg_of(*overrides))


GPT = ["model=transformer", "dataset=tokens"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["strategy=tp", "launcher.nproc_per_node=3", *GPT],
            "does not divide model.heads = 4|does not divide model.hidden",
        ),
        (
            ["strategy=fsdp_tp", "strategy.tp=8", "launcher.nproc_per_node=8", *GPT, "model.heads=4"],
            "does not divide model.heads",
        ),
        (["strategy=tp", "model=cnn", "dataset.input_shape=[3,32,32]"], "models with one: mlp, transformer"),
        (["strategy=pp", "launcher.nproc_per_node=4", "model.layers=2"], "4 pipeline stages .* has 2 blocks"),
        (["strategy=pp", "strategy.schedule=interleaved1f1b", "model.layers=3"], "4 pipeline stages"),
        (["strategy=pp", "strategy.microbatches=3"], "does not split into strategy.microbatches=3"),
        (
            ["strategy=pp", "launcher.nproc_per_node=4", "strategy.microbatches=2"],
            "1f1b needs at least as many microbatches as stages",
        ),
        (["strategy=pp", "strategy.schedule=1f1b", "strategy.stages_per_rank=2"], "one stage per rank"),
        (["strategy=pp", "strategy.schedule=warp"], "strategy.schedule=warp is not one of"),
        (["strategy=mp", "strategy.microbatches=4"], "for microbatches use strategy=pp"),
        (["strategy=fsdp_tp", "launcher.nproc_per_node=3"], "tp=2 = 2 ranks, but the launcher gives 3"),
        (
            ["strategy=fsdp_tp_pp", "launcher.nproc_per_node=6", *GPT],
            "pp=2 × tp=2 = 4 ranks, but the launcher gives 6",
        ),
        (
            ["strategy=fsdp_tp", "strategy.cp=2", "strategy.tp=2", "launcher.nproc_per_node=2", *GPT],
            "cp=2 × tp=2 = 4 ranks, but the launcher gives 2",
        ),
        (["strategy=ddp", "strategy.tp=2"], "does not use strategy.tp=2"),
        (["strategy=zero2", "strategy.reshard_after_forward=true"], "use strategy=fsdp"),
        (["strategy=tp", "strategy.sequence_parallel=true"], "sequence-parallel edges .* model=mlp has none"),
        (["model=transformer"], "reads token windows"),
        (["strategy=deepspeed", "train.precision=fp64"], "deepspeed trains in fp32 or bf16"),
    ],
)
def test_strategy_rules_are_checked_before_launch(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg_of(*overrides))


def test_hybrids_infer_the_data_parallel_degree():
    d = validate(
        cfg_of("strategy=fsdp_tp_pp", "launcher.nproc_per_node=8", *GPT, "train.global_batch_size=16")
    )
    assert (d.pp, d.dp_shard, d.tp) == (2, 2, 2)
    d = validate(cfg_of("strategy=ddp_pp", "launcher.nproc_per_node=4", *GPT))
    assert (d.pp, d.dp_replicate) == (2, 2)


def test_bad_config_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    job = tmp_path / "job"
    proc = run(["strategy=single", "launcher.nproc_per_node=2", f"hydra.run.dir={job}"], timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [
        "paralab: config error: strategy=single runs in one process, but the launcher starts 2; "
        "set launcher.nproc_per_node=1 launcher.nnodes=1 (or launcher=local)"
    ]
    assert not job.exists(), "a rejected job leaves no directory"


def test_rejected_job_keeps_what_was_already_in_its_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run(["train.optimizer=adam", f"hydra.run.dir={tmp_path}"], timeout=60)
    assert proc.returncode == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"
