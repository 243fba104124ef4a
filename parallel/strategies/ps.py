"""A synchronous parameter server over torch.distributed.rpc (TensorPipe), beside the collectives.

Every rank is a worker: it computes gradients on its share of the batch, as DDP does, and sends
them by RPC to the server, which lives on rank 0 beside that rank's worker. When all workers of a
step have reported, the server averages their gradients (in rank order, so the sum is the same
every run), steps rank 0's optimizer, and answers every worker with the new parameters and the
gradient norm. No collective carries the gradients: this is the pre-all-reduce design (Li et al.,
OSDI 2014) that paralab can compare against DDP.

The RPC agent meets in the job's store, under a prefix of its own.
RPC traffic does not pass through c10d, so paralab's communication counter does not see it.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from experiments.config.schema import Config, ConfigError
from parallel.base import Engine, Parallelized, StrategyContext, module_forward_backward
from parallel.distenv import job_store_init_method

SERVER = "ps0"


class _Server:
    """Lives on rank 0: gathers one step's gradients from every worker, then steps once."""

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, workers: int) -> None:
        self.params, self.optimizer, self.workers = params, optimizer, workers
        self.lock = threading.Lock()
        self.pending: dict[int, list[Tensor]] = {}
        self.done: torch.futures.Future = torch.futures.Future()

    def report(self, rank: int, grads: list[Tensor]) -> torch.futures.Future:
        with self.lock:
            self.pending[rank] = grads
            done = self.done
            if len(self.pending) == self.workers:
                self._step()
                self.done = torch.futures.Future()
            return done

    def _step(self) -> None:
        per_rank = [self.pending[r] for r in sorted(self.pending)]
        self.pending = {}
        for i, p in enumerate(self.params):
            total = per_rank[0][i].clone()
            for g in per_rank[1:]:
                total += g[i]
            p.grad = (total / self.workers).to(p.device)
        norms = torch.stack(torch._foreach_norm([p.grad for p in self.params], 2.0))
        sq = torch.dot(norms, norms).cpu()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done.set_result(([p.detach().cpu().clone() for p in self.params], sq))


_server: _Server | None = None


@rpc.functions.async_execution
def _report(rank: int, grads: list[Tensor]) -> torch.futures.Future:
    assert _server is not None, "the server lives on rank 0"
    return _server.report(rank, grads)


class ParameterServerEngine(Engine):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        global _server
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.rank, world = dist.get_rank(), dist.get_world_size()
        self.device = device
        if self.rank == 0:
            _server = _Server(self.params, optimizer, world)
        _init_rpc(self.rank, world)

    def step(self) -> Tensor:
        grads = [
            p.grad.detach().cpu() if p.grad is not None else torch.zeros_like(p).cpu() for p in self.params
        ]
        params, sq = rpc.rpc_sync(SERVER, _report, args=(self.rank, grads))
        with torch.no_grad():
            for p, new in zip(self.params, params, strict=True):
                p.copy_(new)
                p.grad = None
        return sq.to(self.device)

    def close(self) -> None:
        rpc.shutdown()


def _init_rpc(rank: int, world: int) -> None:
    # TensorPipe's own sockets follow TP_SOCKET_IFNAME (loopback on one node).
    rpc.init_rpc(
        f"ps{rank}",
        rank=rank,
        world_size=world,
        rpc_backend_options=rpc.TensorPipeRpcBackendOptions(init_method=job_store_init_method("rpc")),
    )


def check(cfg: Config) -> None:
    """What the parameter server does not do, before any process starts."""
    if cfg.train.grad_clip > 0:
        # The server steps the averaged gradients as they come; it has no clipping of its own.
        raise ConfigError(
            f"strategy=ps does not clip gradients (train.grad_clip={cfg.train.grad_clip}); "
            "set train.grad_clip=0, or use strategy=ddp"
        )


def apply_ps(model: nn.Module, mesh: DeviceMesh, ctx: StrategyContext) -> Parallelized:
    def make_optimizer(module: nn.Module, spec) -> torch.optim.Optimizer:
        opt = spec(module.parameters())
        par.engine = ParameterServerEngine(module, opt, ctx.device)
        return opt

    par = Parallelized(
        model=model,
        forward_backward=module_forward_backward(model, ctx),
        make_optimizer=make_optimizer,
        notes=["ps: gradients to a parameter server on rank 0 over torch.distributed.rpc (TensorPipe)"],
    )
    return par
