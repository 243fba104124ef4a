"""Checks that do not lean on the reference run.

Parity compares each strategy with one process running the same code, so a defect in a piece both
share (the LR schedule, the optimizer's update, the loss, clipping, the data order, the held-out
metrics) passes it by construction. Each test here holds one shared piece against numbers computed
by hand, in this file, from the formula paralab documents (docs/trust.md). Training runs in this
process (launcher=local) in fp64, so the hand computations can be held to 1e-10.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.data import TensorDataset

from data.sampler import ShardedBatchSampler, eval_index_batches
from data.spec import DataSpec
from experiments.config.schema import typed_config
from experiments.report.parity import compose_config, run_case
from experiments.train.evaluate import Evaluator
from experiments.train.setup import loss_fn_for
from parallel.base import Parallelized, StrategyContext
from parallel.strategies.deepspeed import installed as deepspeed_installed
from tests.helpers import TINY

IN_PROCESS = [*TINY, "launcher=local", "train.precision=fp64"]
EXACT = 1e-10  # fp64 arithmetic done in another order


class Steps:
    """What every optimizer step of a run sees, from torch's global optimizer hooks: whichever
    strategy, pipeline or engine built the optimizer, these fire when it steps."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = defaultdict(list)
        self.before: list[list[torch.Tensor]] = []
        self.grads: list[list[torch.Tensor | None]] = []
        self.after: list[list[torch.Tensor]] = []

    def params(self, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for g in opt.param_groups for p in g["params"]]

    def pre(self, opt, args, kwargs) -> None:
        self.lrs[id(opt)].append(opt.param_groups[0]["lr"])
        self.before.append([p.detach().clone() for p in self.params(opt)])
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in self.params(opt)])

    def post(self, opt, args, kwargs) -> None:
        self.after.append([p.detach().clone() for p in self.params(opt)])


def recorded_run(tmp_path, *overrides: str) -> tuple[Steps, dict]:
    steps = Steps()
    handles = [register_optimizer_step_pre_hook(steps.pre), register_optimizer_step_post_hook(steps.post)]
    try:
        metrics = run_case([*IN_PROCESS, *overrides], tmp_path / "job")
    finally:
        for h in handles:
            h.remove()
    return steps, metrics


# ---- the learning rate at every step ----


def closed_form_lr(lr: float, schedule: str, warmup: int, steps: int, t: int) -> float:
    """docs/trust.md: linear warmup from lr/warmup to lr, then constant or a half cosine to 0 at the last step."""
    if t < warmup:
        return lr * (t + 1) / warmup
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))
    return lr


DEEPSPEED = pytest.mark.skipif(not deepspeed_installed(), reason="needs the optional extra .[deepspeed]")


@pytest.mark.parametrize(
    "strategy",
    ["single", "ddp", "zero1", "fsdp", "pp", pytest.param("deepspeed", marks=DEEPSPEED)],
)
@pytest.mark.parametrize(("schedule", "warmup"), [("constant", 0), ("constant", 3), ("cosine", 3)])
def test_the_optimizer_that_steps_sees_the_schedules_closed_form_lr(tmp_path, strategy, schedule, warmup):
    lr, n = 0.05, 8
    precision = ["train.precision=fp32"] if strategy == "deepspeed" else []  # DeepSpeed has no fp64
    steps, _ = recorded_run(
        tmp_path,
        f"strategy={strategy}",
        f"train.steps={n}",
        f"train.lr={lr}",
        f"train.lr_schedule={schedule}",
        f"train.warmup_steps={warmup}",
        *precision,
    )
    expected = [closed_form_lr(lr, schedule, warmup, n, t) for t in range(n)]
    assert steps.lrs, "no optimizer stepped"
    for seen in steps.lrs.values():  # a wrapper (ZeRO-1) and the optimizer it steps: both
        assert seen == pytest.approx(expected, rel=EXACT, abs=0)


# ---- one optimizer step, by hand ----


def sgd_by_hand(before, grads, lr, momentum, decay):
    """torch.optim.SGD's documented update (dampening 0, no Nesterov), step by step."""
    out, buf = [], None
    for p, g in zip(before, grads, strict=True):
        d = [gi + decay * pi for gi, pi in zip(g, p, strict=True)]
        buf = d if buf is None else [momentum * b + di for b, di in zip(buf, d, strict=True)]
        out.append([pi - lr * b for pi, b in zip(p, buf, strict=True)])
    return out


def adamw_by_hand(before, grads, lr, decay, b1=0.9, b2=0.999, eps=1e-8):
    """AdamW (Loshchilov & Hutter): decoupled decay, bias-corrected moments; torch's defaults."""
    out = []
    m = [torch.zeros_like(g) for g in grads[0]]
    v = [torch.zeros_like(g) for g in grads[0]]
    for t, (p, g) in enumerate(zip(before, grads, strict=True), start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        c1, c2 = 1 - b1**t, 1 - b2**t
        out.append(
            [
                pi * (1 - lr * decay) - lr * (mi / c1) / ((vi / c2).sqrt() + eps)
                for pi, mi, vi in zip(p, m, v, strict=True)
            ]
        )
    return out


@pytest.mark.parametrize(
    ("optimizer", "by_hand"),
    [
        (["train.optimizer=sgd", "train.momentum=0.9", "train.weight_decay=0.01"], sgd_by_hand),
        (["train.optimizer=adamw", "train.weight_decay=0.1"], adamw_by_hand),
    ],
    ids=["sgd", "adamw"],
)
def test_each_optimizer_step_is_the_update_computed_by_hand(tmp_path, optimizer, by_hand):
    lr = 0.01
    steps, _ = recorded_run(tmp_path, "strategy=single", "train.steps=4", f"train.lr={lr}", *optimizer)
    kwargs = {"momentum": 0.9, "decay": 0.01} if by_hand is sgd_by_hand else {"decay": 0.1}
    expected = by_hand(steps.before, steps.grads, lr, **kwargs)
    assert len(expected) == len(steps.after) == 4
    for t, (want, got) in enumerate(zip(expected, steps.after, strict=True)):
        for w, g in zip(want, got, strict=True):
            assert torch.allclose(g, w, rtol=EXACT, atol=1e-14), f"step {t + 1}: {(g - w).abs().max()}"
        # ... and the run took its parameters on from where the last step left them.
        if t:
            assert all(torch.equal(a, b) for a, b in zip(steps.after[t - 1], steps.before[t], strict=True))


# ---- the loss ----


def cross_entropy_by_hand(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = logits.double().reshape(-1, logits.shape[-1])
    targets = y.reshape(-1)
    return (rows.exp().sum(-1).log() - rows[torch.arange(len(targets)), targets]).mean()


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_the_training_loss_is_cross_entropy_by_hand(task):
    g = torch.Generator().manual_seed(0)
    if task == "lm":  # next-token prediction: every token of every window counts once
        spec = DataSpec(task="lm", input_shape=(6,), num_classes=11, vocab_size=11, seq_len=6)
        logits, y = torch.randn(3, 6, 11, generator=g), torch.randint(0, 11, (3, 6), generator=g)
    else:
        spec = DataSpec(task="classify", input_shape=(4,), num_classes=5)
        logits, y = torch.randn(7, 5, generator=g), torch.randint(0, 5, (7,), generator=g)
    loss = loss_fn_for(spec)(logits.double(), y)  # paralab computes the loss in fp32
    assert loss.item() == pytest.approx(cross_entropy_by_hand(logits, y).item(), rel=1e-6)


# ---- gradient clipping ----


@pytest.mark.parametrize("bound", [1e-3, 1e6], ids=["below-every-norm", "above-every-norm"])
def test_clipping_scales_to_the_threshold_only_above_it(tmp_path, bound):
    steps, metrics = recorded_run(tmp_path, "strategy=single", "train.steps=4", f"train.grad_clip={bound}")
    for t, (norm, grads) in enumerate(zip(metrics["grad_norms"], steps.grads, strict=True)):
        at_step = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
        # torch's clip_grad_norm_ rule: scale by min(1, bound / (norm + 1e-6)).
        expected = norm * min(1.0, bound / (norm + 1e-6))
        # The logged norm is fp32 (the Meter's buffer); the gradients are fp64.
        assert at_step == pytest.approx(expected, rel=1e-6), f"step {t + 1}: norm {norm}, bound {bound}"


# ---- the data order ----


def documented_batches(n, batch, rank, ranks, seed, epochs):
    """docs/trust.md: epoch e is torch.randperm(n) under a generator seeded seed + e; each global
    batch takes the next `batch` of it (a remainder is dropped); rank r takes the r-th slice."""
    local = batch // ranks
    for e in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
        for start in range(0, n - batch + 1, batch):
            yield order[start + rank * local : start + (rank + 1) * local]


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_the_sampler_deals_the_documented_permutation_and_resumes_exactly(ranks):
    n, batch, seed, epochs = 22, 8, 5, 4  # 2 batches an epoch, 6 samples dropped
    per_epoch = n // batch
    for rank in range(ranks):
        want = list(documented_batches(n, batch, rank, ranks, seed, epochs))
        sampler = ShardedBatchSampler(n, batch, rank, ranks, seed, shuffle=True)
        it = iter(sampler)
        assert [next(it) for _ in want] == want
        for start in (1, per_epoch, per_epoch + 1, len(want) - 1):  # resume mid-epoch and at a boundary
            resumed = iter(ShardedBatchSampler(n, batch, rank, ranks, seed, shuffle=True, start=start))
            assert [next(resumed) for _ in want[start:]] == want[start:], f"rank {rank} from {start}"
    # Held-out batches: in order, each sample once, the filler rows marked as not real.
    dealt = [(i.tolist(), r.tolist()) for i, r in eval_index_batches(5, 4, 1, 2)]
    assert dealt == [([2, 3], [True, True]), ([0, 0], [False, False])]


# ---- held-out accuracy and perplexity ----


def evaluate_on(x: torch.Tensor, y: torch.Tensor, task: str, batch: int):
    """Paralab's Evaluator over (x, y) with a model whose output is its input: the logits are x."""
    cfg = typed_config(compose_config(["train.eval_samples=-1", f"train.global_batch_size={batch}"]))
    ctx = StrategyContext(cfg, torch.device("cpu"), loss_fn_for(SimpleNamespace(task=task)))
    model = torch.nn.Identity()
    par = Parallelized(model=model, forward_backward=None, eval_forward=lambda xb, yb: xb)  # type: ignore[arg-type]
    spec = SimpleNamespace(task=task)
    ev = Evaluator(TensorDataset(x, y), spec, par, ctx, dp_rank=0, dp_size=1, tp_rank=0)
    return ev.run(step=1, wall_s=0.0)


def test_held_out_accuracy_is_a_hand_count():
    # 5 samples in batches of 4: the second batch holds one real sample and three fillers.
    x = torch.tensor([[2.0, 0, 0], [0, 3, 0], [0, 0, 1], [1, 0, 0], [0, 5, 0]])
    y = torch.tensor([0, 1, 1, 2, 1])  # argmax is right for rows 0, 1, 4: 3 of 5
    r = evaluate_on(x, y, "classify", batch=4)
    assert r.val_acc == 3 / 5
    assert r.val_loss == pytest.approx(cross_entropy_by_hand(x, y).item(), rel=1e-6)  # fp32 logits
    assert r.val_ppl is None


def test_held_out_perplexity_is_exp_of_the_mean_token_loss():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 4, 6, generator=g), torch.randint(0, 6, (3, 4), generator=g)
    r = evaluate_on(x, y, "lm", batch=2)
    loss = cross_entropy_by_hand(x, y).item()  # 12 tokens, each once
    assert r.val_loss == pytest.approx(loss, rel=1e-6)  # the model's logits are fp32
    assert r.val_ppl == pytest.approx(math.exp(loss), rel=1e-6)
    assert r.val_acc is None  # a language model reports perplexity instead


# ---- the mixture of experts ----


def moe_by_hand(moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: softmax over the router's logits, the top-k experts, their probabilities
    renormalised; and per sample Switch's experts × Σ_e f_e·P_e, averaged over the samples."""
    b, s, d = x.shape
    n, k = moe.experts.count, moe.top_k
    w1, w2, w3 = moe.experts.w1, moe.experts.w2, moe.experts.w3

    def expert(e: int, v: torch.Tensor) -> torch.Tensor:  # SwiGLU, written out
        h = w1[e] @ v
        return w2[e] @ (h * torch.sigmoid(h) * (w3[e] @ v))

    out = torch.zeros_like(x)
    aux = []
    for i in range(b):
        counts, prob_sum = [0.0] * n, [0.0] * n
        for t in range(s):
            probs = torch.softmax(x[i, t] @ moe.router.weight.T, dim=-1)
            top = sorted(range(n), key=lambda e: -probs[e].item())[:k]
            norm = sum(probs[e] for e in top)
            for e in top:
                out[i, t] += probs[e] / norm * expert(e, x[i, t])
                counts[e] += 1
            for e in range(n):
                prob_sum[e] += probs[e].item()
        aux.append(n * sum(counts[e] / (s * k) * prob_sum[e] / s for e in range(n)))
    return out, torch.tensor(sum(aux) / b, dtype=x.dtype)


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_mixture_of_experts_is_the_routing_computed_by_hand(top_k):
    from models.moe import MoE

    torch.manual_seed(0)
    moe = MoE(dim=8, hidden=12, experts=4, top_k=top_k).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    want, want_aux = moe_by_hand(moe, x)
    got = moe(x)
    assert torch.allclose(got, want, rtol=EXACT, atol=1e-14), (got - want).abs().max()
    assert moe.last_aux.item() == pytest.approx(want_aux.item(), rel=EXACT)


def test_the_training_loss_of_a_mixture_adds_its_load_balancing_loss():
    from experiments.train.setup import with_aux_loss
    from models.llama import Llama

    torch.manual_seed(0)
    spec = DataSpec(task="lm", input_shape=(6,), vocab_size=11, seq_len=6)
    model = Llama(11, 6, 16, 2, 4, 2, 4, 8, 10000.0, 1e-5, 6, experts=3, top_k=2, aux_loss_coef=0.5).double()
    x = torch.randint(0, 11, (2, 6))
    y = torch.randint(0, 11, (2, 6))
    terms: list[torch.Tensor] = []
    logits = model(x)
    loss = with_aux_loss(loss_fn_for(spec), model, terms)(logits, y)
    by_hand = sum(moe_by_hand(m, _moe_input(model, m, x))[1] for m in model.moe)
    want = cross_entropy_by_hand(logits.detach(), y) + 0.5 * by_hand
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert len(terms) == 1 and terms[0].item() == pytest.approx(0.5 * by_hand.item(), rel=1e-9)


def _moe_input(model, moe, x: torch.Tensor) -> torch.Tensor:
    """What `moe` received in the forward of `x` (the block's normed residual stream)."""
    seen: list[torch.Tensor] = []
    handle = moe.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]
