"""Deliberately broken implementations for `make mutants`, injected at interpreter start.

Python imports `sitecustomize` from sys.path at every start, so with
`PYTHONPATH=tests/mutants:<repo>` and `PARALAB_MUTANT=<name>` every process of a run gets the same
mutant: pytest itself, torchrun's agent, the forkserver and the ranks it forks, spawned ranks and
`python train.py` subprocesses. Without PARALAB_MUTANT this module does nothing (not even import
torch). With it, one import hook waits for the paralab module that looks the target name up and
patches that module right after it executes, so the project's files are never edited.

With PARALAB_MUTANT_TRACE=<file> each process appends `<pid> <mutant> armed`, then
`<pid> <mutant> patched <module>` once the hook has fired, and `<pid> <mutant> hit <what>` the
first time the broken code runs in that process: proof that the ranks, not only the parent, ran it.
"""

from __future__ import annotations

import os
import sys

MUTANT = os.environ.get("PARALAB_MUTANT", "")
TRACE = os.environ.get("PARALAB_MUTANT_TRACE", "")


def _chain_shadowed_sitecustomize() -> None:
    """Run the sitecustomize this one shadows (a distribution's, later on sys.path), if any."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None or spec.origin == os.path.abspath(__file__):
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_chain_shadowed_sitecustomize()


def trace(event: str) -> None:
    if TRACE:
        fd = os.open(TRACE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {MUTANT} {event}\n".encode())
        finally:
            os.close(fd)


_hit_in: dict[str, int] = {}


def hit(what: str) -> None:
    """Record, once per process, that the broken code ran (forked children record their own)."""
    if _hit_in.get(what) != os.getpid():
        _hit_in[what] = os.getpid()
        trace(f"hit {what}")


# ---------------------------------------------------------------------------------------------
# The mutants: each patches one module, the one where paralab looks the name up, after it runs.


def tp_noop(tensor) -> None:
    """parallel.strategies.tensor: parallelize_module shards nothing and returns the module unchanged."""

    def parallelize_module(module, device_mesh=None, parallelize_plan=None, **kwargs):
        hit("parallelize_module")
        return module

    tensor.parallelize_module = parallelize_module


def ddp_sync_every_microstep(ddp) -> None:
    """parallel.strategies.ddp: DistributedDataParallel.no_sync is a null context, so every micro-step syncs."""
    from contextlib import nullcontext

    def no_sync(self):
        hit("DistributedDataParallel.no_sync")
        return nullcontext()

    ddp.DistributedDataParallel.no_sync = no_sync


def autocast_ignored(base) -> None:
    """parallel.base: the `torch` that StrategyContext.autocast calls has an autocast that does nothing."""
    import types
    from contextlib import nullcontext

    real = base.torch

    class TorchWithoutAutocast(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def autocast(*args, **kwargs):
            hit("torch.autocast")
            return nullcontext()

    base.torch = TorchWithoutAutocast("torch")


def fsdp_full_params(fsdp) -> None:
    """parallel.strategies.fsdp: fully_shard keeps the full parameters (and the module still takes
    set_requires_gradient_sync, so accumulation runs)."""

    def fully_shard(module, **kwargs):
        hit("fully_shard")
        module.set_requires_gradient_sync = lambda requires_gradient_sync, *, recurse=True: None
        return module

    fsdp.fully_shard = fully_shard


def pp_wrong_blocks(pipeline) -> None:
    """parallel.strategies.pipeline: the stages get the block groups in reverse order; the model still runs."""
    split = pipeline.split_blocks

    def split_blocks(names, num_stages):
        hit("split_blocks")
        return list(reversed(split(names, num_stages)))

    pipeline.split_blocks = split_blocks


def zero1_unsharded(zero) -> None:
    """parallel.strategies.zero: the ZeRO-1 optimizer is a plain one of the same class, full state on every rank."""

    def ZeroRedundancyOptimizer(params, optimizer_class, process_group=None, **kwargs):  # noqa: N802
        hit("ZeroRedundancyOptimizer")
        return optimizer_class(params, **kwargs)

    zero.ZeroRedundancyOptimizer = ZeroRedundancyOptimizer


def sampler_same_samples(sampler) -> None:
    """data.sampler: every data-parallel rank takes the first slice of the global batch."""
    cls = sampler.ShardedBatchSampler
    init = cls.__init__

    def __init__(self, *args, **kwargs):  # noqa: N807
        init(self, *args, **kwargs)
        if self.offset:
            hit("ShardedBatchSampler.offset")
        self.offset = 0

    cls.__init__ = __init__


# ---- shared pieces: the single-process reference runs the same code, so parity cannot see these ----


def lr_warmup_off_by_one(optim) -> None:
    """parallel.optim: warmup starts at 0 and reaches lr a step late (step / warmup, not (step + 1) / warmup)."""
    real = optim.lr_lambda

    def lr_lambda(cfg, step):
        if step < cfg.warmup_steps:
            hit("lr_lambda")
            return step / cfg.warmup_steps
        return real(cfg, step)

    optim.lr_lambda = lr_lambda


def adamw_coupled_decay(optim) -> None:
    """parallel.optim: train.optimizer=adamw builds Adam, whose weight decay is L2 in the gradient."""
    import torch

    real = optim.optimizer_spec

    def optimizer_spec(cfg):
        spec = real(cfg)
        if spec.cls is torch.optim.AdamW:
            hit("optimizer_spec")
            return optim.OptimizerSpec(torch.optim.Adam, spec.kwargs)
        return spec

    optim.optimizer_spec = optimizer_spec


def loss_label_smoothing(setup) -> None:
    """experiments.train.setup: the training loss is cross-entropy with label smoothing 0.1."""
    import torch.nn.functional as F

    def loss_fn_for(spec):
        def loss(logits, y):
            hit("loss_fn")
            if spec.task == "lm":
                logits, y = logits.flatten(0, 1), y.flatten()
            return F.cross_entropy(logits.float(), y, label_smoothing=0.1)

        return loss

    setup.loss_fn_for = loss_fn_for


def clip_without_sqrt(step) -> None:
    """experiments.train.step: clipping scales by the bound over the squared norm, not the norm."""
    import torch

    def clip_(norm, sq, max_norm):
        hit("clip_")
        coef = torch.clamp(max_norm / (sq + 1e-6), max=1.0)
        torch._foreach_mul_(norm.local_grads(), coef)

    step.clip_ = clip_


def sampler_no_reshuffle(sampler) -> None:
    """data.sampler: every epoch deals the first epoch's permutation again."""
    import torch

    def index_batches(self):
        hit("ShardedBatchSampler.index_batches")
        per_epoch = self.n // self.batch
        epoch, skip = divmod(self.start, per_epoch)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
            for start in range(skip * self.batch, self.n - self.batch + 1, self.batch):
                yield order[start + self.offset : start + self.offset + self.local]
            epoch, skip = epoch + 1, 0

    sampler.ShardedBatchSampler.index_batches = index_batches


def eval_counts_padding(evaluate) -> None:
    """experiments.train.evaluate: the filler rows of the last held-out batch are counted as samples."""
    import torch

    real_sums = evaluate._sums

    def _sums(logits, y, real):
        if not bool(real.all()):
            hit("evaluate._sums")
        return real_sums(logits, y, torch.ones_like(real))

    evaluate._sums = _sums


def moe_aux_over_batch(moe) -> None:
    """models.moe: the load-balancing loss over the rank's whole batch, not per sample (Switch's
    original form), so its average over data-parallel ranks is not the whole batch's."""
    real = moe.load_balance

    def load_balance(probs, chosen, whole=None):
        hit("moe.load_balance")
        return real(probs.reshape(1, -1, probs.shape[-1]), chosen.reshape(1, -1, chosen.shape[-1]), whole)

    moe.load_balance = load_balance


def moe_aux_dropped(setup) -> None:
    """experiments.train.setup: the load-balancing loss is logged but not added to the loss."""

    def with_aux_loss(loss_fn, model, terms):
        def loss(out, y):
            hit("setup.with_aux_loss")
            terms.append(model.aux_loss().detach())
            return loss_fn(out, y)

        return loss

    setup.with_aux_loss = with_aux_loss


def ac_noop(levers) -> None:
    """parallel.levers: activation checkpointing names its blocks but checkpoints none of them."""
    real = levers.checkpointed_blocks

    def apply_ac(model, ac, every):
        hit("levers.apply_ac")
        blocks = levers.blocks_of(model)
        return [] if blocks is None else [list(blocks)[i] for i in real(len(blocks), ac, every)]

    levers.apply_ac = apply_ac


def ac_selective_keeps_nothing(levers) -> None:
    """parallel.levers: selective AC's policy recomputes every op (it is full AC in all but name)."""
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, op, *args, **kwargs):
        hit("levers._policy")
        return CheckpointPolicy.PREFER_RECOMPUTE

    levers._policy = policy


def activations_count_params(activations) -> None:
    """experiments.measure.activations: the weights a layer keeps for backward count as activations."""

    def places(module):
        hit("activations._places")
        return set()

    activations._places = places


def hsdp_whole_world(fsdp) -> None:
    """parallel.strategies.fsdp: HSDP shards over every data rank (plain FSDP), no replica groups."""
    real = fsdp.fsdp_mesh

    def fsdp_mesh(mesh, replicate=False):
        if not replicate:
            return real(mesh, replicate)
        hit("fsdp.fsdp_mesh")
        return mesh["dp_replicate", "dp_shard"]._flatten()

    fsdp.fsdp_mesh = fsdp_mesh


def cp_whole_sequence(context) -> None:
    """parallel.strategies.context: every cp rank holds every position of each sequence. The
    losses stay one process's (a key seen cp times weighs the same in a softmax): only the
    layout and the communication can tell."""
    import torch

    def head_tail(seq_len, cp, rank):
        hit("context.head_tail")
        return torch.arange(seq_len)

    context.head_tail = head_tail


def ep_every_expert(expert) -> None:
    """parallel.strategies.expert: expert parallelism splits nothing; every rank keeps every
    expert (FSDP shards them with the rest), and the losses stay one process's."""

    def apply_ep(model, ep_mesh, fsdp_kwargs):
        hit("expert.apply_ep")

    expert.apply_ep = apply_ep


# Not a mutant: a fault a test injects the same way (tests/test_timeline.py), so that the project
# carries no test hook. `make mutants` does not run it.
DELAY_S = 0.3


def delay_rank1_allreduce(ddp) -> None:
    """parallel.strategies.ddp: rank 1 enters each step's first DDP all-reduce DELAY_S late (a
    comm hook that sleeps, then all-reduces as DDP does)."""
    real = ddp.wrap_ddp

    def wrap_ddp(model, mesh, ctx):
        import time

        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        module = real(model, mesh, ctx)
        if dist.get_rank() == 1:

            def late(group, bucket):
                if bucket.index() == 0:
                    hit("ddp.late_allreduce")
                    time.sleep(DELAY_S)
                return allreduce_hook(group, bucket)

            module.register_comm_hook(mesh["dp_replicate"].get_group(), late)
        return module

    ddp.wrap_ddp = wrap_ddp


def plan_ignores_tp(sizes) -> None:
    """experiments.plan.sizes: the advisor forgets tensor parallelism's split: each rank of a TP
    plan is predicted to hold every weight whole."""
    import dataclasses

    real = sizes.rank_sizes

    def rank_sizes(profile, cfg, degrees, spec, pp_rank=0):
        if degrees.tp > 1:
            hit("plan.rank_sizes")
            degrees = dataclasses.replace(degrees, tp=1)
        return real(profile, cfg, degrees, spec, pp_rank)

    sizes.rank_sizes = rank_sizes


# name -> (module to patch, patch)
MUTANTS = {
    "tp_noop": ("parallel.strategies.tensor", tp_noop),
    "ddp_sync_every_microstep": ("parallel.strategies.ddp", ddp_sync_every_microstep),
    "autocast_ignored": ("parallel.base", autocast_ignored),
    "fsdp_full_params": ("parallel.strategies.fsdp", fsdp_full_params),
    "pp_wrong_blocks": ("parallel.strategies.pipeline", pp_wrong_blocks),
    "zero1_unsharded": ("parallel.strategies.zero", zero1_unsharded),
    "sampler_same_samples": ("data.sampler", sampler_same_samples),
    "lr_warmup_off_by_one": ("parallel.optim", lr_warmup_off_by_one),
    "adamw_coupled_decay": ("parallel.optim", adamw_coupled_decay),
    "loss_label_smoothing": ("experiments.train.setup", loss_label_smoothing),
    "clip_without_sqrt": ("experiments.train.step", clip_without_sqrt),
    "sampler_no_reshuffle": ("data.sampler", sampler_no_reshuffle),
    "eval_counts_padding": ("experiments.train.evaluate", eval_counts_padding),
    "moe_aux_over_batch": ("models.moe", moe_aux_over_batch),
    "moe_aux_dropped": ("experiments.train.setup", moe_aux_dropped),
    "hsdp_whole_world": ("parallel.strategies.fsdp", hsdp_whole_world),
    "cp_whole_sequence": ("parallel.strategies.context", cp_whole_sequence),
    "ep_every_expert": ("parallel.strategies.expert", ep_every_expert),
    "ac_noop": ("parallel.levers", ac_noop),
    "ac_selective_keeps_nothing": ("parallel.levers", ac_selective_keeps_nothing),
    "activations_count_params": ("experiments.measure.activations", activations_count_params),
    "delay_rank1_allreduce": ("parallel.strategies.ddp", delay_rank1_allreduce),
    "plan_ignores_tp": ("experiments.plan.sizes", plan_ignores_tp),
}


# ---------------------------------------------------------------------------------------------
# The post-import hook.


def _install(target: str, patch) -> None:
    import importlib.abc

    def apply(module) -> None:
        patch(module)
        trace(f"patched {target}")

    if target in sys.modules:  # imported before us (not expected): patch it in place
        apply(sys.modules[target])
        return

    class PatchAfterExec(importlib.abc.Loader):
        def __init__(self, loader) -> None:
            self.loader = loader

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module) -> None:
            self.loader.exec_module(module)
            apply(module)

        def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and tools
            return getattr(self.loader, name)

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target_module=None):
            if fullname != target:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target_module)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = PatchAfterExec(spec.loader)
                    return spec
            return None

    sys.meta_path.insert(0, Finder())


if MUTANT:
    if MUTANT not in MUTANTS:
        sys.exit(f"PARALAB_MUTANT={MUTANT}: unknown mutant; choose one of {', '.join(MUTANTS)}")
    trace("armed")
    _install(*MUTANTS[MUTANT])
