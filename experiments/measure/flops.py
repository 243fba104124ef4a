"""MFU's two halves: the FLOPs a training step does, and the peak of the devices doing them.

FLOPs are counted op by op (torch.utils.flop_counter) over one forward and backward of the
model built on the meta device: convolutions, attention and embeddings get their real cost, not
6·N per token, and no memory or time is spent. The peak is that of the dtype the matmuls and
convolutions really run in: bf16 under autocast or an FSDP bf16 parameter policy, TF32 when
torch lets fp32 matmuls (or cuDNN convolutions) use it, else fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from data.spec import DataSpec
from experiments.config.schema import Config

# Dense peak TFLOP/s per device from the vendors' datasheets (sparsity figures halved), by the
# dtype the tensor cores run. Matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),  # SXM ("H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM4 and PCIe alike
]


def compute_dtype(cfg: Config, tf32_matmul: bool, tf32_conv: bool, has_conv: bool) -> str:
    """The dtype the step's FLOPs run in: what the peak must be read for."""
    if cfg.train.precision == "bf16" or cfg.strategy.mp_param_dtype == "bf16":
        return "bf16"
    if cfg.train.precision == "fp64":
        return "fp64"
    if tf32_matmul or (has_conv and tf32_conv):
        return "tf32"
    return "fp32"


def datasheet_peak(device_name: str, dtype: str) -> float:
    """Peak FLOP/s of one device, 0 when the device is not in the table."""
    name = device_name.lower()
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in name:
            return peaks.get(dtype, 0.0) * 1e12  # no fp64 column: no MFU
    return 0.0


def cuda_tf32() -> tuple[bool, bool]:
    """Whether fp32 matmuls / cuDNN convolutions may run in TF32 (torch's defaults: no / yes)."""
    return torch.get_float32_matmul_precision() != "highest", bool(torch.backends.cudnn.allow_tf32)


def peak_flops_per_s(device: torch.device, cfg: Config, has_conv: bool) -> tuple[float, str]:
    """(peak FLOP/s of one device, dtype it is for); train.peak_tflops overrides; 0 = unknown."""
    if device.type != "cuda":
        return 0.0, ""
    dtype = compute_dtype(cfg, *cuda_tf32(), has_conv)
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12, dtype
    return datasheet_peak(torch.cuda.get_device_name(device), dtype), dtype


def training_flops_per_sample(
    build: Callable[[], torch.nn.Module], spec: DataSpec, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> tuple[float, bool]:
    """(FLOPs of forward + backward for one sample, whether the model convolves), on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build()
    has_conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    n = 2  # BatchNorm refuses to train on one sample; every counted op is linear in the batch
    x, y = spec.example(n, "meta")
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(x), y).backward()
    return counter.get_total_flops() / n, has_conv
