"""Megatron-style tensor-parallel plans for pre-norm decoder blocks (attention, then feed-forward),
shared by the GPT and Llama models: each declares its layer names, this builds the plan."""

from __future__ import annotations


def decoder_block_plan(
    attention_in: tuple[str, ...],
    attention_out: str,
    ffn_in: tuple[str, ...],
    ffn_out: str,
    norms: tuple[str, str],
    sequence_parallel: bool,
) -> dict[str, object]:
    """q/k/v and the feed-forward's input projections split by columns (heads, hidden units), the
    output projections by rows, so each sublayer needs one all-reduce forward and one backward.
    With sequence parallelism the norms run on sequence shards and the all-reduce becomes
    reduce-scatter + all-gather."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    between = Shard(1) if sequence_parallel else Replicate()
    # One DTensor input per sublayer, shared by its input projections: their input gradients add
    # up as one partial sum and are reduced once, as in Megatron, not once per projection.
    gather = PrepareModuleInput(
        input_layouts=(between,), desired_input_layouts=(Replicate(),), use_local_output=False
    )
    attention, ffn = attention_out.rpartition(".")[0], ffn_out.rpartition(".")[0]
    plan: dict[str, object] = {attention: gather, ffn: gather}
    plan |= {name: ColwiseParallel() for name in (*attention_in, *ffn_in)}
    plan |= {name: RowwiseParallel(output_layouts=between) for name in (attention_out, ffn_out)}
    if sequence_parallel:
        plan |= {norm: SequenceParallel() for norm in norms}
    return plan


def sequence_parallel_edges() -> dict[str, object]:
    """Shard the embedding output along the sequence; gather it again before the head."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput

    return {
        "stem": PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),)),
        "head": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
    }
