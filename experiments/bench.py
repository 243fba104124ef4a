"""paralab's DDP loop against a minimal hand-written DDP loop: same model, data, world size.

Run under torchrun (`make bench`). Each repeat runs, in turn: paralab's training loop as shipped
(TensorBoard, timers, loss and grad-norm reductions, comm/memory sampling every 50 steps),
the same with sampling off, and a hand-written loop. Ratios are of median loop wall times from
this one run; nothing here gates CI.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from data import build_dataset, dataset_spec
from experiments.config import Config
from experiments.distenv import rank_env, set_threads
from experiments.log import setup_rank_logging
from experiments.loop import train
from experiments.metrics import read_metrics
from experiments.parity import compose_config
from models import build_model

OVERRIDES = [
    "strategy=ddp",
    "model=mlp",
    "model.hidden=256",
    "model.layers=4",
    "dataset.input_shape=[128]",
    "dataset.num_samples=8192",
    "train.global_batch_size=256",
    "train.steps=100",
    "train.log_every=1000",
]
REPEATS = 5


def paralab_wall(cfg: Config, job: Path, log) -> float:
    job.mkdir(parents=True, exist_ok=True)
    train(cfg, rank_env(), torch.device("cpu"), job, log)
    wall = torch.tensor(read_metrics(job)["wall_s"] if dist.get_rank() == 0 else 0.0)
    dist.broadcast(wall, 0)
    return wall.item()


def handwritten_wall(cfg: Config) -> float:
    """What a user would write by hand: DDP, SGD, a shuffled slice per step."""
    t, world, rank = cfg.train, dist.get_world_size(), dist.get_rank()
    x_all, y_all = build_dataset(cfg.dataset, cfg.seed).tensors
    torch.manual_seed(cfg.seed)
    model = DistributedDataParallel(build_model(cfg.model, dataset_spec(cfg.dataset)))
    opt = torch.optim.SGD(model.parameters(), lr=t.lr)
    local = t.global_batch_size // world
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(cfg.seed))
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(t.steps):
        start = (step * t.global_batch_size) % (len(x_all) - t.global_batch_size) + rank * local
        idx = order[start : start + local]
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    dist.init_process_group("gloo")
    cfg: Config = OmegaConf.to_object(compose_config([*OVERRIDES, *argv]))  # type: ignore[assignment]
    cfg = dataclasses.replace(
        cfg, launcher=dataclasses.replace(cfg.launcher, nproc_per_node=dist.get_world_size())
    )
    quiet = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, measure_every=0))
    set_threads(cfg, rank_env())
    box = [tempfile.mkdtemp(prefix="paralab-bench-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, 0)
    root = Path(box[0])  # type: ignore[arg-type]
    log = setup_rank_logging(root, dist.get_rank())
    log.setLevel("WARNING")
    shipped, unsampled, hand = [], [], []
    for r in range(REPEATS):  # interleaved, so drift in machine load hits all three alike
        shipped.append(paralab_wall(cfg, root / f"shipped{r}", log))
        unsampled.append(paralab_wall(quiet, root / f"unsampled{r}", log))
        hand.append(handwritten_wall(cfg))
    if dist.get_rank() == 0:
        med = {
            k: statistics.median(v)
            for k, v in (("paralab", shipped), ("no sampling", unsampled), ("hand", hand))
        }
        steps = cfg.train.steps * cfg.train.global_batch_size
        print(
            f"world={dist.get_world_size()} steps={cfg.train.steps} repeats={REPEATS} (median loop wall time)"
        )
        for k, v in med.items():
            print(f"  {k:<12} {v:7.3f} s  {steps / v:9.1f} samples/s")
        print(
            f"throughput ratio paralab / hand-written DDP: {med['hand'] / med['paralab']:.3f}  (target >= 0.98)"
        )
        print(
            f"measurement overhead (sampling on step 2 and every 50): {100 * (med['paralab'] / med['no sampling'] - 1):+.1f}%"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
