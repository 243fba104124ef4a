"""The GPU path's arithmetic and rules, checked where no GPU is needed (make gpu-check runs the rest)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from data import dataset_spec
from experiments.config.schema import typed_config
from experiments.measure.flops import compute_dtype, datasheet_peak, training_flops_per_sample
from experiments.measure.theory import ring_bytes
from experiments.report.parity import compose_config
from experiments.train.setup import loss_fn_for
from models import build_model
from parallel.distenv import check_gpus
from tests.helpers import REPO, child_env


def _flops(*overrides: str) -> tuple[float, int, int]:
    cfg = typed_config(compose_config(["strategy=single", "launcher=local", *overrides]))
    spec = dataset_spec(cfg.dataset)  # type: ignore[union-attr]
    n = sum(p.numel() for p in build_model(cfg.model, spec).parameters())  # type: ignore[union-attr]
    flops, _ = training_flops_per_sample(lambda: build_model(cfg.model, spec), spec, loss_fn_for(spec))  # type: ignore[union-attr]
    return flops, n, max(1, spec.seq_len if spec.task == "lm" else 1)


def test_mlp_flops_are_about_six_per_parameter():
    flops, n, _ = _flops("model=mlp")
    # Forward 2N, backward 4N, less the input gradient nobody needs: just under 6N.
    assert 5 * n < flops <= 6 * n


def test_convolutions_cost_far_more_than_six_flops_per_parameter():
    flops, n, _ = _flops("model=cnn", "dataset=fake_images", "dataset.input_shape=[1,28,28]")
    assert flops > 20 * 6 * n  # each filter is applied at every position


def test_attention_flops_grow_with_the_sequence():
    common = ("model=transformer", "dataset=tokens", "model.max_seq_len=512")
    short, _, t_short = _flops(*common, "dataset.seq_len=32")
    long, _, t_long = _flops(*common, "dataset.seq_len=256")
    # 6N per token is the same at any length; attention's scores make a long token dearer.
    assert long / t_long > 1.05 * short / t_short


@pytest.mark.parametrize(
    ("overrides", "tf32_matmul", "tf32_conv", "has_conv", "dtype"),
    [
        (["train.precision=bf16"], False, True, False, "bf16"),
        (["strategy=fsdp", "strategy.mp_param_dtype=bf16"], False, True, False, "bf16"),
        ([], False, True, True, "tf32"),  # cuDNN convolutions run TF32 by default
        ([], False, True, False, "fp32"),
        ([], True, False, False, "tf32"),  # torch.set_float32_matmul_precision("high")
    ],
)
def test_mfu_peak_follows_the_dtype_the_step_computes_in(overrides, tf32_matmul, tf32_conv, has_conv, dtype):
    cfg = typed_config(compose_config(["strategy=ddp", *overrides]))
    assert compute_dtype(cfg, tf32_matmul, tf32_conv, has_conv) == dtype  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H100 NVL", "tf32", 417.5),
        ("NVIDIA H200", "fp32", 67.0),
        ("NVIDIA A100-PCIE-40GB", "tf32", 156.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA GeForce RTX 4090", "bf16", 0.0),  # unknown: no MFU unless train.peak_tflops is set
    ],
)
def test_datasheet_peaks_cover_pcie_parts(name, dtype, tflops):
    assert datasheet_peak(name, dtype) == tflops * 1e12


def test_more_ranks_than_gpus_is_refused_for_auto_too_and_says_what_to_do():
    problem = check_gpus("auto", 2, 1)
    assert "launcher.nproc_per_node=2" in problem and "1 GPU" in problem
    assert "nproc_per_node<=1" in problem and "train.device=cpu" in problem
    assert check_gpus("auto", 2, 0) == ""  # no GPU: auto means CPU/gloo
    assert check_gpus("cpu", 8, 1) == ""
    assert "no CUDA device" in check_gpus("cuda", 1, 0)


def test_received_bytes_are_not_counted_as_sent():
    assert ring_bytes("send", 100, 2) == 100 and ring_bytes("recv", 100, 2) == 0


def test_gpu_check_on_cpu_says_it_needs_a_gpu_and_succeeds():

    proc = subprocess.run(
        [sys.executable, "-m", "experiments.report.gpu_check"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
    )

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: make gpu-check runs the real checks")
    assert proc.returncode == 0 and "needs a CUDA GPU" in proc.stdout
