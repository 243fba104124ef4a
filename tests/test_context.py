"""Context parallelism's ring attention (parallel/strategies/context.py) equals causal SDPA on the
whole sequence, output and gradients, with and without grouped kv heads, run by torchrun over
real gloo ranks. End to end, the parity matrix trains with it to one process's losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.strategies.context import head_tail

ROOT = Path(__file__).resolve().parents[1]


def test_head_tail_chunks_balance_the_causal_work():
    cp, s = 4, 32
    held = [head_tail(s, cp, r) for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(s))
    # Under the causal mask a query at position p attends to p + 1 keys: equal sums, equal work.
    assert len({int((h + 1).sum()) for h in held}) == 1


@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.full)])
def test_ring_attention_is_causal_sdpa_on_the_whole_sequence(ranks):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            str(ROOT / "tests" / "ring_probe.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
