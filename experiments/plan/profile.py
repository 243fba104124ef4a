"""One forward and backward of a model on the meta device, op by op: what the time model prices.

Each aten op is attributed to the part of the model that ran it (the stem, one block, the head),
in forward or backward, with its FLOPs (torch.utils.flop_counter's formulas) and the bytes it
writes. Nothing is allocated and nothing runs, so a 70B model profiles in seconds. A pipeline
rank, a tensor-parallel shard or a context-parallel slice is then priced from these parts
(experiments/plan/timing.py) rather than profiled again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from data.spec import DataSpec, loss_fn_for
from experiments.config.schema import ModelConfig
from models.moe import GroupedExperts
from models.staged import blocks_of, tp_plan_of

# Ops that move no data (views, metadata): still dispatched by the host, priced apart.
_FREE = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "expand",
    "permute",
    "as_strided",
    "detach",
    "alias",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "split",
    "split_with_sizes",
    "unbind",
    "reshape",
    "_reshape_alias",
    "lift_fresh",
    "empty_like",
    "empty",
    "zeros_like",
    "new_empty",
    "new_empty_strided",
    "empty_strided",
}
# Ops whose FLOPs are matmul-like: they run at the device's matmul throughput, by size.
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}
REFERENCE_SAMPLES = 2  # BatchNorm refuses one sample; every priced quantity is linear in the batch


@dataclass
class Part:
    """One part of the model (stem, a block, head) in one direction (forward or backward)."""

    ops: int = 0  # ops that launch work
    views: int = 0  # ops that only make views or metadata
    # Each matmul-like op: its (m, k, n) and which of the three grow with the batch.
    matmuls: list[tuple[tuple[float, float, float], tuple[bool, bool, bool]]] = field(default_factory=list)
    matmul_flops: list[float] = field(default_factory=list)  # theirs, at the reference batch
    attention_flops: float = 0.0  # fused attention (grows with the sequence squared)
    # Each fused attention call: (batch·heads, queries, keys, head dim).
    attention: list[tuple[float, float, float, float]] = field(default_factory=list)
    backward: bool = False
    other_flops: float = 0.0
    # Each other op's bytes written, whether they grow with the batch (a weight's gradient does
    # not), and whether it runs inside a tensor-parallel region (between a column- and a
    # row-parallel linear, where a TP rank holds 1/tp of the features): elementwise work is
    # bound by memory.
    writes: list[tuple[float, bool, bool]] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return sum(self.matmul_flops) + self.attention_flops + self.other_flops


@dataclass
class ModelProfile:
    """A model's parts at REFERENCE_SAMPLES samples, and its parameters by part."""

    forward: dict[str, Part]
    backward: dict[str, Part]
    params: dict[str, list[tuple[str, tuple[int, ...]]]]  # part -> (name within the part, shape)
    block_names: list[str]
    samples: int = REFERENCE_SAMPLES
    # Block parameters tensor parallelism splits (name within a block -> the dim it splits), from
    # the model's TP plan (those a block has: a plan names a bias a bias-free linear lacks); those
    # of a mixture's experts, which expert parallelism splits instead.
    tp_split: dict[str, int] = field(default_factory=dict)
    expert_params: frozenset[str] = frozenset()

    def flops_per_sample(self) -> float:
        return sum(p.flops for d in (self.forward, self.backward) for p in d.values()) / self.samples

    @property
    def psi(self) -> int:
        return sum(math.prod(s) for ps in self.params.values() for _, s in ps)


class _Attribute(TorchDispatchMode):
    def __init__(self, profile: ModelProfile) -> None:
        super().__init__()
        self.profile, self.part, self.direction = profile, "stem", "forward"
        self.in_region = False

    def __call__(self, part: str, direction: str) -> None:
        self.part, self.direction = part, direction

    def book(self) -> Part:
        return getattr(self.profile, self.direction).setdefault(
            self.part, Part(backward=self.direction == "backward")
        )

    def attention(self, flops: float, shape: tuple[float, float, float, float]) -> None:
        book = self.book()
        book.ops += 1
        book.attention_flops += flops
        book.attention.append(shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        book = self.book()
        if name in _FREE:
            book.views += 1
            return out
        book.ops += 1
        counter = flop_registry.get(func._overloadpacket)
        flops = float(counter(*args, **kwargs, out_val=out)) if counter is not None else 0.0
        if name in _MATMUL:
            book.matmul_flops.append(flops)
            book.matmuls.append((_mnk(name, args, flops), (False, False, False)))
        else:
            book.other_flops += flops
            outs = out if isinstance(out, (tuple, list)) else (out,)
            written = sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
            book.writes.append((float(written), False, self.in_region))
        return out


def _mnk(name: str, args: tuple, flops: float) -> tuple[float, float, float]:
    """A matmul's (m, k, n); a batched one's batch folded into m; a convolution as the GEMM it
    lowers to is unknown here: a cube of its FLOPs."""
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        m = math.prod(a.shape[:-1])
        return float(m), float(a.shape[-1]), float(b.shape[-1])
    side = max(flops / 2, 1.0) ** (1 / 3)
    return side, side, side


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention as the fused kernels run it: one op each way, FLOPs by formula.
    On the meta device torch would take its math path (scores materialised, softmax, four bmm in
    backward), which is neither what CPU's flash kernel nor CUDA's does."""

    @staticmethod
    def forward(ctx, mode: _Attribute, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        ctx.mode, ctx.shapes = mode, (q, k, v)
        b, h, sq, d = q.shape
        sk = k.shape[-2]
        # QKᵀ and PV: 2·2·b·h·sq·sk·d; a causal kernel skips the blocks above the diagonal.
        ctx.flops = 4 * b * h * sq * sk * d * (0.5 if causal else 1.0)
        ctx.shape = (float(b * h), float(sq), float(sk), float(d))
        mode.attention(ctx.flops, ctx.shape)
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v = ctx.shapes
        ctx.mode.attention(
            2.5 * ctx.flops, ctx.shape
        )  # recompute QKᵀ, then dV, dP, dQ, dK: 5 matmuls to forward's 2
        return None, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _sdpa(mode: _Attribute):
    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            reps = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(reps, -3), v.repeat_interleave(reps, -3)
        return _FusedAttention.apply(mode, q, k, v, bool(is_causal))

    return attention


def _tp_split(model: nn.Module) -> dict[str, int]:
    """Column-parallel linears split their weight's (and bias's) dim 0, row-parallel ones dim 1."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    out: dict[str, int] = {}
    for module, style in (tp_plan_of(model) or {}).items():
        if isinstance(style, ColwiseParallel):
            out |= {f"{module}.weight": 0, f"{module}.bias": 0}
        elif isinstance(style, RowwiseParallel):
            out[f"{module}.weight"] = 1
    return out


def _tp_regions(model: nn.Module) -> list[str]:
    """The sublayers a TP plan prepares the input of (models/tp.py): its Megatron regions."""
    from torch.distributed.tensor.parallel import PrepareModuleInput

    return [
        name for name, style in (tp_plan_of(model) or {}).items() if isinstance(style, PrepareModuleInput)
    ]


def count_ops(fn) -> int:
    """The ops that launch work in one call of `fn`, as a profile counts them."""
    counted = ModelProfile(forward={}, backward={}, params={}, block_names=[])
    with _Attribute(counted):
        fn()
    return sum(p.ops for d in (counted.forward, counted.backward) for p in d.values())


_PROFILES: dict[tuple[str, bool], ModelProfile] = {}


def profile_of(model: ModelConfig, spec: DataSpec, ops: bool = True) -> ModelProfile:
    """The profile of a model config on data of these shapes, made once per process: a sweep's
    check and the tests ask for the same model under many strategies. `ops=False`: its layout
    only, for memory (milliseconds where a profile takes up to seconds)."""
    from models import meta_model

    key = (repr((model, spec)), ops)
    if key not in _PROFILES:
        built = meta_model(model, spec)
        _PROFILES[key] = profile_model(built, spec) if ops else layout(built)
    return _PROFILES[key]


def profile_model(model: nn.Module, spec: DataSpec) -> ModelProfile:
    """Run `model` (on the meta device) forward and backward on REFERENCE_SAMPLES samples, and
    again on twice as many: what doubled grows with the batch (a token dim of a matmul, an
    activation), what did not is the weights' (a weight's gradient, the optimizer's inputs)."""
    ref = _profile_at(model, spec, REFERENCE_SAMPLES)
    double = _profile_at(model, spec, 2 * REFERENCE_SAMPLES)
    for direction in ("forward", "backward"):
        for name, part in getattr(ref, direction).items():
            other = getattr(double, direction)[name]
            part.matmuls = [
                (dims, tuple(b > a for a, b in zip(dims, dims2, strict=True)))
                for (dims, _), (dims2, _) in zip(part.matmuls, other.matmuls, strict=True)
            ]
            part.writes = [
                (w, w2 > w, region)
                for (w, _, region), (w2, _, _) in zip(part.writes, other.writes, strict=True)
            ]
    return ref


def layout(model: nn.Module) -> ModelProfile:
    """The model's parameters by part, and what TP and EP split: all the memory model reads, with
    no op run (the pre-launch check's; a profile adds the ops)."""
    blocks = blocks_of(model)
    names = list(blocks) if blocks is not None else []
    parts: dict[str, nn.Module] = {n: blocks[n] for n in names} if blocks is not None else {}
    params: dict[str, list[tuple[str, tuple[int, ...]]]] = {p: [] for p in ["stem", *names, "head"]}
    in_blocks = set()
    for n, block in parts.items():
        for pname, p in block.named_parameters():
            params[n].append((pname, tuple(p.shape)))
            in_blocks.add(id(p))
    head = getattr(model, "head", None)
    in_head = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    for pname, p in model.named_parameters():
        if id(p) not in in_blocks:
            params["head" if id(p) in in_head else "stem"].append((pname, tuple(p.shape)))
    return ModelProfile(
        forward={},
        backward={},
        params=params,
        block_names=names,
        tp_split={k: d for k, d in _tp_split(model).items() if names and k in dict(params[names[0]])},
        expert_params=frozenset(
            f"{m}.{p}"
            for m, mod in (parts[names[0]].named_modules() if names else ())
            if isinstance(mod, GroupedExperts)
            for p, _ in mod.named_parameters()
        ),
    )


def _profile_at(model: nn.Module, spec: DataSpec, samples: int) -> ModelProfile:
    profile = layout(model)
    names = profile.block_names
    blocks = blocks_of(model)
    parts: dict[str, nn.Module] = {n: blocks[n] for n in names} if blocks is not None else {}
    mode = _Attribute(profile)
    hooks = []
    # Forward: each block's ops are its own from its pre-hook to its post-hook; what follows the last
    # block is the head's. Backward runs the blocks in reverse: a block's backward pre-hook starts it.
    for n, block in parts.items():
        hooks.append(block.register_forward_pre_hook(lambda m, a, n=n: mode(n, "forward")))
        hooks.append(block.register_full_backward_pre_hook(lambda m, g, n=n: mode(n, "backward")))
    if names:
        hooks.append(parts[names[-1]].register_forward_hook(lambda m, a, o: mode("head", "forward")))
        # The stem's backward begins where the first block's ends: at its input's gradient.
        hooks.append(parts[names[0]].register_full_backward_hook(lambda m, gi, go: mode("stem", "backward")))
    for p in model.parameters():
        p.grad = None  # a second profile must not accumulate into the first one's gradients
    # Inside the TP plan's sublayers (attention, feed-forward) a rank holds 1/tp of the features.
    for block in parts.values():
        for region in _tp_regions(model):
            sub = block.get_submodule(region)
            hooks.append(sub.register_forward_pre_hook(lambda m, a: setattr(mode, "in_region", True)))
            hooks.append(sub.register_forward_hook(lambda m, a, o: setattr(mode, "in_region", False)))
            hooks.append(sub.register_full_backward_pre_hook(lambda m, g: setattr(mode, "in_region", True)))
            hooks.append(sub.register_full_backward_hook(lambda m, gi, go: setattr(mode, "in_region", False)))
    x, y = spec.example(samples, "meta")
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa(mode)  # models call it through the module: F.<name>
    try:
        with torch.random.fork_rng(devices=[]), mode:
            mode("stem" if names else "head", "forward")
            loss = loss_fn_for(spec)(model(x), y)
            mode("head", "backward")
            loss.backward()
    finally:
        F.scaled_dot_product_attention = sdpa
        for p in model.parameters():
            p.grad = None
        for h in hooks:
            h.remove()
    return profile
