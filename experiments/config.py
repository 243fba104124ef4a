"""Structured config schema: every key a user can set, with its type and default.

The dataclasses are registered in Hydra's ConfigStore, so an unknown or mistyped key fails at
compose time. Workers rebuild the same typed object from the job dir's frozen config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

FROZEN_CONFIG = "config.resolved.yaml"


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float = 0.1
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.0
    weight_decay: float = 0.0
    # Clip the global gradient norm to this value (0 = off). One all-reduce of one scalar per step.
    grad_clip: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    deterministic: bool = True
    # Training-state checkpoints (torch.distributed.checkpoint) in <job dir>/checkpoints/step_<N>:
    # every `checkpoint_every` steps (0 = only the final one), the newest `keep_checkpoints` kept
    # (0 = all). resume: auto (the newest complete checkpoint in this job dir, if any) | never |
    # the path of another job dir or checkpoint (it may be of another strategy or world size).
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"
    # Count communication and memory on step 3 and every `measure_every` steps (0 = never). The
    # counter sees every op, so these steps are left out of the reported throughput.
    measure_every: int = 50
    # CUDA only: torch.cuda.set_sync_debug_mode("error") over the clean steps between log steps, so
    # any host sync the loop or a strategy adds there raises instead of stalling silently.
    check_syncs: bool = False
    # Peak dense TFLOP/s of one device for MFU; 0 = look it up by GPU name (no MFU on CPU).
    peak_tflops: float = 0.0


@dataclass
class StrategyConfig:
    name: str = MISSING
    # Degrees for tensor and pipeline parallelism; the data-parallel degree is what is left of the world.
    tp: int = 1
    pp: int = 1
    # DDP knobs (ddp, zero1, ddp_pp).
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    # FSDP2: True reshards parameters after forward (ZeRO-3), False keeps them (ZeRO-2).
    reshard_after_forward: bool = True
    # FSDP2 MixedPrecisionPolicy: param dtype for compute and grad-reduce dtype (fp32 | bf16).
    mp_param_dtype: str = "fp32"
    mp_reduce_dtype: str = "fp32"
    # DeepSpeed (strategy=deepspeed): its ZeRO stage, 1 | 2 | 3.
    zero_stage: int = 3
    # Tensor parallel: shard norms/dropout along the sequence between the TP regions.
    sequence_parallel: bool = False
    # Pipeline: schedule name and microbatches per local batch; stages per rank for interleaved ones.
    schedule: str = "gpipe"
    microbatches: int = 4
    stages_per_rank: int = 1


@dataclass
class ModelConfig:
    name: str = MISSING  # mlp | cnn | resnet18 | transformer
    hidden: int = 64
    layers: int = 4
    ffn_mult: int = 4
    heads: int = 4
    channels: int = 16
    max_seq_len: int = 256


@dataclass
class DatasetConfig:
    name: str = MISSING  # synthetic | tokens | mnist | cifar10 | fake_images
    root: str = "data_root"
    download: bool = False
    # torchvision checks CIFAR files against published MD5s; tiny test files cannot match them.
    verify_checksums: bool = True
    num_samples: int = 4096
    input_shape: list[int] = field(default_factory=lambda: [32])
    num_classes: int = 10
    vocab_size: int = 64
    seq_len: int = 32
    text_file: str = ""
    num_workers: int = 0
    shuffle: bool = True


@dataclass
class LauncherConfig:
    name: str = MISSING  # local | spawn | torchrun | slurm
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    # host:port of the c10d rendezvous; empty picks a free loopback port (single node).
    rdzv_endpoint: str = ""
    rdzv_backend: str = "c10d"  # c10d | static
    rdzv_id: str = ""
    max_restarts: int = 0
    # How local ranks start (spawn and torchrun): forkserver imports torch once, spawn once per rank.
    start_method: str = "forkserver"
    # Intra-op threads per rank; 0 divides the machine's cores evenly among the local ranks.
    threads_per_rank: int = 0
    # Seconds a collective (or the initial rendezvous of the ranks) may wait for a peer before the
    # job fails naming the rank and the collective: a stuck or stopped rank is an error, not a hang.
    timeout_s: int = 600
    # Seconds the ranks get to stop on their own (SIGTERM: checkpoint at the next log step; Ctrl-C)
    # before the launcher kills them.
    grace_s: int = 30
    # SLURM
    partition: str = ""
    time_min: int = 30
    gpus_per_node: int = 0
    submit: bool = True


@dataclass
class Config:
    strategy: StrategyConfig = MISSING
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    launcher: LauncherConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0


def register_configs() -> None:
    # One schema for the whole tree: each group's yaml is merged into its typed field.
    ConfigStore.instance().store(name="paralab_schema", node=Config)


def save_frozen(cfg: DictConfig, job_dir: Path) -> Path:
    """Write the fully resolved config that workers load instead of running Hydra."""
    path = job_dir / FROZEN_CONFIG
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    OmegaConf.save(OmegaConf.create(plain), path)
    return path


def load_frozen(job_dir: Path) -> Config:
    loaded = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(job_dir / FROZEN_CONFIG))
    return OmegaConf.to_object(loaded)  # type: ignore[return-value]


class ConfigError(ValueError):
    """A config that cannot run; its message is the one line the user sees."""
