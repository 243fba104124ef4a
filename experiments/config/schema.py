"""Structured config schema: every key a user can set, with its type and default.

The dataclasses are registered in Hydra's ConfigStore, so an unknown or mistyped key fails at
compose time. Workers rebuild the same typed object from the job dir's frozen config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

FROZEN_CONFIG = "config.resolved.yaml"


# Closed choices are Enums, so a wrong value fails at compose time as a wrong key does. They are
# StrEnums: each member equals its string ("adamw"), so code and YAML compare them as strings.
class Optimizer(StrEnum):
    sgd = "sgd"
    adamw = "adamw"


class LRSchedule(StrEnum):
    constant = "constant"
    cosine = "cosine"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast
    # Parameters and inputs in float64. For checking a strategy against one process: in fp32 a
    # pre-activation within rounding of zero can land on either side of a ReLU when a kernel
    # blocks its sums differently, and move that step's gradient by ~1e-3.
    fp64 = "fp64"


class MixedDtype(StrEnum):
    """FSDP2's MixedPrecisionPolicy dtypes."""

    fp32 = "fp32"
    bf16 = "bf16"


class Device(StrEnum):
    auto = "auto"  # cuda when visible
    cpu = "cpu"
    cuda = "cuda"


class Objective(StrEnum):
    val_loss = "val_loss"
    train_loss = "train_loss"  # the last step's
    samples_per_s = "samples_per_s"


class AC(StrEnum):
    """Activation checkpointing of the model's blocks (parallel/levers.py)."""

    none = "none"
    full = "full"  # keep each checkpointed block's input, recompute all of it in backward
    selective = "selective"  # keep its matmul and attention outputs, recompute the cheap ops


class RdzvBackend(StrEnum):
    c10d = "c10d"
    static = "static"


class StartMethod(StrEnum):
    forkserver = "forkserver"
    spawn = "spawn"


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float = 0.1
    lr_schedule: LRSchedule = LRSchedule.constant
    warmup_steps: int = 0
    optimizer: Optimizer = Optimizer.sgd
    momentum: float = 0.0
    weight_decay: float = 0.0
    # Clip the global gradient norm to this value (0 = off). One all-reduce of one scalar per step.
    grad_clip: float = 0.0
    precision: Precision = Precision.fp32
    log_every: int = 10
    device: Device = Device.auto
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
    # Held-out evaluation every `eval_every` steps (0 = only after the last step), over the first
    # `eval_samples` samples of the held-out split (-1 = all of it, 0 = no evaluation).
    eval_every: int = 0
    eval_samples: int = -1
    # What the Hydra job returns for sweepers to minimise or maximise.
    objective: Objective = Objective.val_loss
    # Activation checkpointing of every `ac_every`-th block (blocks k, 2k, ... counting from 1).
    ac: AC = AC.none
    ac_every: int = 1
    # torch.compile each block's forward (inductor); its compile time is logged apart from steps.
    compile: bool = False
    # torch.profiler over `profile_steps` steps from `profile_from` on every rank: a Chrome trace per
    # rank in <job dir>/traces/, and the step split into compute, exposed and overlapped
    # communication per mesh axis, bubble and other (time/*). Those steps leave the throughput.
    profile: bool = False
    profile_from: int = 4
    profile_steps: int = 2
    # CUDA only: torch.cuda.memory's snapshot of the sampled steps, per rank, in <job dir>/memory/
    # (open at pytorch.org/memory_viz).
    memory_snapshot: bool = False
    # After the run, rank 0 writes the strategy advisor's prediction for this config on `cluster`
    # beside the measurement (metrics.json's `plan`; a meta-device profile, ~0.1 s).
    predict: bool = True


@dataclass
class StrategyConfig:
    name: str = MISSING
    # Degrees for tensor and pipeline parallelism; the data-parallel degree is what is left of the world.
    tp: int = 1
    pp: int = 1
    # HSDP: replica groups; FSDP shards within each group over the ranks left (strategy=hsdp).
    dp_replicate: int = 1
    # Context parallelism: ranks that split every sequence (attention as a ring); the FSDP family.
    cp: int = 1
    # Expert parallelism: ranks of dp_shard that split a mixture's experts (all-to-all dispatch).
    ep: int = 1
    # DDP knobs (ddp, zero1, ddp_pp).
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    # FSDP2: True reshards parameters after forward (ZeRO-3), False keeps them (ZeRO-2).
    reshard_after_forward: bool = True
    # FSDP2 MixedPrecisionPolicy: param dtype for compute and grad-reduce dtype.
    mp_param_dtype: MixedDtype = MixedDtype.fp32
    mp_reduce_dtype: MixedDtype = MixedDtype.fp32
    # DeepSpeed (strategy=deepspeed): its ZeRO stage, 1 | 2 | 3.
    zero_stage: int = 3
    # Parameters, gradients and optimizer state in host memory (FSDP2's CPUOffloadPolicy,
    # DeepSpeed's offload_optimizer): CUDA only, since on CPU they live there already.
    offload: bool = False
    # Tensor parallel: shard norms/dropout along the sequence between the TP regions.
    sequence_parallel: bool = False
    # Pipeline: schedule name and microbatches per local batch; stages per rank for interleaved ones.
    schedule: str = "gpipe"
    microbatches: int = 4
    stages_per_rank: int = 1


# Keys of a model config that are Hydra's or paralab's, not the constructor's.
MODEL_KEYS = ("_target_", "_partial_", "name")


@dataclass
class ModelConfig:
    """A model: what its config's `_target_` names (an nn.Module class, or a function returning
    one), called with the config's other keys (`args`) and the dataset's shapes it asks for
    (models/__init__.py). The model group is open: its keys are the constructor's arguments, so a
    user's model brings its own; a key the constructor does not take is refused before launch."""

    target: str = MISSING  # _target_
    args: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # a label for logs and reports; the target's last name when empty
    source: str = ""  # the config file it came from, where known: errors name it

    @property
    def label(self) -> str:
        return self.name or self.target.rpartition(".")[2].lower()

    def get(self, key: str, default: Any = None) -> Any:
        return self.args.get(key, default)


def model_config(node: Any) -> ModelConfig:
    """The typed model from its composed (or frozen) node."""
    if isinstance(node, ModelConfig):
        return node
    if not isinstance(node, dict) or not node.get("_target_"):
        raise ConfigError(
            "model has no _target_: a model config names the class that builds it, e.g. "
            "_target_: models.mlp.MLP (docs/models.md)"
        )
    if not isinstance(node["_target_"], str):
        raise ConfigError(f"model._target_={node['_target_']} must be a dotted name, e.g. models.mlp.MLP")
    name = node.get("name", "")
    args = {k: v for k, v in node.items() if k not in MODEL_KEYS}
    # _partial_ is how paralab calls every model (models.build_model); true or not, it is the same.
    return ModelConfig(target=node["_target_"], args=args, name=str(name))


@dataclass
class DatasetConfig:
    name: str = MISSING  # synthetic | tokens | mnist | cifar10 | fake_images, or a user's dataset
    root: str = "data_root"
    download: bool = False
    # torchvision checks CIFAR files against published MD5s; tiny test files cannot match them.
    verify_checksums: bool = True
    num_samples: int = 4096
    # Size of the held-out split of synthetic, tokens (Markov) and fake_images; mnist/cifar10 use
    # their test split, a text file its last 10% of windows.
    val_samples: int = 512
    input_shape: list[int] = field(default_factory=lambda: [32])
    num_classes: int = 10
    vocab_size: int = 64
    seq_len: int = 32
    text_file: str = ""
    num_workers: int = 0
    shuffle: bool = True
    # A user's dataset (data/user.py): the class or function `_target_` names, called with `args`
    # and the split; its samples' shapes and classes are the keys above, checked before launch.
    _target_: str = ""
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class LauncherConfig:
    name: str = MISSING  # local | spawn | torchrun (SLURM: hydra/launcher=submitit_slurm)
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    # host:port of the c10d rendezvous; empty picks a free loopback port (single node).
    rdzv_endpoint: str = ""
    rdzv_backend: RdzvBackend = RdzvBackend.c10d
    rdzv_id: str = ""
    max_restarts: int = 0
    # How local ranks start (spawn and torchrun): forkserver imports torch once, spawn once per rank.
    start_method: StartMethod = StartMethod.forkserver
    # Intra-op threads per rank; 0 divides the machine's cores evenly among the local ranks.
    threads_per_rank: int = 0
    # Seconds a collective (or the initial rendezvous of the ranks) may wait for a peer before the
    # job fails naming the rank and the collective: a stuck or stopped rank is an error, not a hang.
    timeout_s: int = 600
    # Seconds the agent waits for every node to join the rendezvous (nnodes > 1) before it gives up.
    join_timeout_s: int = 600
    # Seconds the ranks get to stop on their own (SIGTERM: checkpoint at the next log step; Ctrl-C)
    # before the launcher kills them.
    grace_s: int = 30
    # GPUs a SLURM job (hydra/launcher=submitit_slurm) asks for on each node; -1 = one per rank,
    # or none when train.device=cpu. Partition, time and the rest: hydra.launcher.* (submitit's).
    gpus_per_node: int = -1


class ClusterDevice(StrEnum):
    cpu = "cpu"  # ranks are processes sharing the node's cores and RAM
    cuda = "cuda"


@dataclass
class LinkConfig:
    """One kind of link a collective's ring crosses: inside a node, or between nodes."""

    # Seconds each call waits before the first byte moves (per ring step: a ring over n ranks
    # pays it n − 1 times per phase), and the bytes per second one device sends on this link.
    alpha_us: float = 10.0
    gb_per_s: float = 10.0


@dataclass
class ClusterConfig:
    """What the advisor plans for (experiments/plan): nodes of identical devices and their links.

    The numbers are published peaks times an efficiency until `make calibrate` measures the
    machine and writes `calibration`, which replaces them (experiments/plan/cluster.py)."""

    name: str = MISSING
    device: ClusterDevice = ClusterDevice.cuda
    nodes: int = 1
    devices_per_node: int = 8  # GPUs; CPU: the cores the ranks share (one rank per core at most)
    memory_gib: float = 80.0  # per device; CPU: the node's RAM, shared by its ranks
    # Dense peak TFLOP/s per device by the dtype the matmuls run in, and the share of it large
    # matmuls achieve (the uncalibrated guess; calibration measures it by shape).
    peak_tflops_bf16: float = 0.0
    peak_tflops_tf32: float = 0.0
    peak_tflops_fp32: float = 0.0
    matmul_efficiency: float = 0.6
    # Fused attention's share of the peak (FlashAttention-2 reaches ~35-40 % of an H100's bf16 peak
    # forward and backward, per its paper's figures), where calibration has not measured it.
    attention_efficiency: float = 0.4
    # A matmul of this many FLOPs runs at half the efficiency above: small ones are launch-bound.
    half_efficiency_gflop: float = 1.0
    # Device memory bandwidth: an elementwise op moves ~3× the bytes it writes (two inputs read).
    mem_gb_per_s: float = 1000.0
    op_overhead_us: float = 5.0  # per dispatched op: the host's launch cost, paid when it exceeds the op
    intra: LinkConfig = field(default_factory=LinkConfig)
    inter: LinkConfig = field(default_factory=LinkConfig)
    # Share of the communication a strategy may overlap (DDP's buckets, FSDP's prefetch) that
    # really hides behind compute: 1 where copy engines and spare SMs run it, ~0 on a CPU whose
    # cores the compute already fills (gloo reduces on the same cores).
    overlap: float = 1.0
    # A `make calibrate` file (relative to the project root); missing: the numbers above.
    calibration: str = ""


@dataclass
class Config:
    strategy: StrategyConfig = MISSING
    # Open: a model's keys are its constructor's (ModelConfig.args); typed by model_config().
    model: Any = MISSING
    dataset: DatasetConfig = MISSING
    launcher: LauncherConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    # The cluster each job's step time is predicted for (metrics.json's `plan`), and `make plan`'s.
    cluster: ClusterConfig = MISSING
    seed: int = 0


def register_configs() -> None:
    # One schema for the whole tree: each group's yaml is merged into its typed field.
    ConfigStore.instance().store(name="paralab_schema", node=Config)


def save_frozen(cfg: DictConfig, job_dir: Path) -> str:
    """Write the fully resolved config that workers load instead of running Hydra; return its text."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    text = OmegaConf.to_yaml(OmegaConf.create(plain))
    # Atomic: the agents of a multi-node job write the same shared file, and may read it meanwhile.
    tmp = job_dir / f".{FROZEN_CONFIG}.{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, job_dir / FROZEN_CONFIG)
    return text


def load_frozen(job_dir: Path, text: str | None = None) -> Config:
    """The job's config: `text` when the launcher passed it, else the job dir's frozen file."""
    frozen = OmegaConf.create(text) if text is not None else OmegaConf.load(job_dir / FROZEN_CONFIG)
    if "cluster" not in frozen:
        # A job dir from before the advisor: it ran on this machine.
        frozen.cluster = OmegaConf.load(
            Path(__file__).resolve().parents[2] / "conf" / "cluster" / "this_machine.yaml"
        )
    return typed_config(OmegaConf.merge(OmegaConf.structured(Config), frozen))


def typed_config(cfg: DictConfig) -> Config:
    """The composed config as dataclasses, its open model node typed."""
    typed: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    typed.model = model_config(typed.model)
    return typed


class ConfigError(ValueError):
    """A config that cannot run; its message is the one line the user sees."""
