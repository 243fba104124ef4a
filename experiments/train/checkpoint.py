"""Training-state checkpoints with torch.distributed.checkpoint: any strategy saves, any loads.

A checkpoint is `<job dir>/checkpoints/step_<N>/`, written by every rank through DCP and counted
only once rank 0 has renamed a `.complete` marker into it (after `dcp.save` returned, so every
rank's files and the metadata are on disk). A save killed half-way leaves no marker, and resume
never picks it up.

Everything is keyed by the model's own parameter names (FQNs): the model through torch's
`get_model_state_dict`, the optimizer state per parameter name (ZeroRedundancyOptimizer's shards
included), so DCP reshards on load: fsdp at 4 ranks resumes as ddp at 2, tp as a single process.
Loading reads pickled metadata: a checkpoint is code, as a model file is; load only your own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from experiments.measure.record import write_atomic
from experiments.train.state import TrainState

# DCP (and DTensor with it, ~0.8 s of CPU) is imported where a checkpoint is written or read, by
# the ranks: `python train.py` only finds checkpoints (resolve), before it launches anything.

CHECKPOINTS = "checkpoints"
COMPLETE = ".complete"


def step_dir(job_dir: Path, step: int) -> Path:
    return job_dir / CHECKPOINTS / f"step_{step}"


def complete_checkpoints(job_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under job_dir, oldest first."""
    root = job_dir / CHECKPOINTS
    found = []
    for d in root.glob("step_*") if root.is_dir() else ():
        tail = d.name.removeprefix("step_")
        if tail.isdigit() and (d / COMPLETE).is_file():
            found.append((int(tail), d))
    return sorted(found)


def resolve(resume: str, job_dir: Path) -> Path | None:
    """The checkpoint train.resume names: auto = newest complete here, never, or a job/step dir."""
    if resume == "never":
        return None
    source = job_dir if resume == "auto" else Path(resume).expanduser()
    if (source / COMPLETE).is_file():
        return source
    found = complete_checkpoints(source)
    if found:
        return found[-1][1]
    if resume != "auto":
        raise FileNotFoundError(f"train.resume={resume}: no complete checkpoint there")
    return None


def unreadable(path: Path, model: nn.Module) -> str | None:
    """What stops the checkpoint at `path` from loading into `model` (built on the meta device),
    read from DCP's metadata alone: a shard file shorter than the metadata says, or the first of
    the model's tensors that it lacks or holds in another shape. None where it loads."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read it is the one thing to say
        return f"its metadata ({path / '.metadata'}) cannot be read: {type(e).__name__}: {e}"
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = path / name
        size = shard.stat().st_size if shard.is_file() else -1
        if size < end:
            return f"its shard {shard} is {'missing' if size < 0 else f'truncated ({size} of {end} bytes)'}"
    stored = metadata.state_dict_metadata
    for name, tensor in model.state_dict().items():
        held = stored.get(f"model.{name}")
        if held is None:
            return f"it holds no {name}: a checkpoint of another model"
        shape = list(getattr(held, "size", []))
        if shape != list(tensor.shape):
            return (
                f"its {name} is {shape}, this model's is {list(tensor.shape)}: a checkpoint of another model"
            )
    return None


def _optimizer_state(state: TrainState) -> dict[str, dict[str, Any]]:
    """This rank's optimizer state by parameter name: live tensors, so a load fills them in place.

    An engine's state lives in its own partitions: it hands over whole tensors by name instead.
    """
    from parallel.layout import local_optimizer

    held = state.engine.optimizer_state(state.model) if state.engine is not None else None
    if held is not None:
        return held
    names = {id(p): n for n, p in state.model.named_parameters()}
    inner = local_optimizer(state.optimizer)
    return {names[id(p)]: dict(s) for p, s in inner.state.items() if id(p) in names}


def _state(state: TrainState, rank: int) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {
        "model": get_model_state_dict(state.model),
        "optim": _optimizer_state(state),
        f"rng/rank{rank}": state.rng_state(),
    }


def save(state: TrainState, job_dir: Path, progress: dict[str, Any], keep: int) -> Path:
    """Collective: every rank writes its shards; rank 0 marks the checkpoint complete and prunes."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    path = step_dir(job_dir, state.step)
    with state.whole_parameters():
        sd = _state(state, rank)
        # One JSON string: DCP would flatten a nested dict into keys that a fresh template lacks.
        sd["train"] = json.dumps(
            {
                "step": state.step,
                "data_position": state.data_position,
                "scheduler": state.scheduler.state_dict(),
                **progress,
            }
        )
        dcp.save(sd, checkpoint_id=str(path))
    if rank == 0:
        write_atomic(path / COMPLETE, f"{state.step}\n")
        _prune(job_dir, keep, newest=state.step)
    return path


def _prune(job_dir: Path, keep: int, newest: int) -> None:
    """Keep the newest `keep` complete checkpoints (0 = all); drop older unfinished ones."""
    complete = complete_checkpoints(job_dir)
    doomed = [p for _, p in complete[:-keep]] if keep else []
    kept = {p for _, p in complete}
    for d in (job_dir / CHECKPOINTS).glob("step_*"):
        tail = d.name.removeprefix("step_")
        if d not in kept and tail.isdigit() and int(tail) < newest:
            doomed.append(d)  # a save that died before its marker
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)


def load(state: TrainState, path: Path) -> dict[str, Any]:
    """Collective: fill the live model, optimizer, scheduler and RNG from `path`; return progress."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import _init_optim_state, set_model_state_dict

    rank = dist.get_rank()
    if state.engine is not None and not state.engine.resumable:
        raise NotImplementedError(
            f"this strategy cannot resume from a checkpoint yet ({path}); resume it with another "
            "strategy (train.resume=<this job dir> in a new job), or start over with train.resume=never"
        )
    _init_optim_state(state.optimizer)  # optimizer state exists lazily; DCP loads into tensors
    state.optimizer.zero_grad(set_to_none=True)
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    with state.whole_parameters(modify=True):
        sd = _state(state, rank)
        if not any(k.startswith(f"rng/rank{rank}") for k in stored):
            del sd[f"rng/rank{rank}"]  # another world size: data order is seeded, dropout is not used
        sd["train"] = ""
        dcp.load(sd, checkpoint_id=str(path))
        set_model_state_dict(state.model, sd["model"])
        if state.engine is not None:
            state.engine.load(state.model, sd["optim"])
    if f"rng/rank{rank}" in sd:
        state.set_rng_state(sd[f"rng/rank{rank}"])
    train = json.loads(sd["train"])
    state.step, state.data_position = train["step"], train["data_position"]
    state.scheduler.load_state_dict(train["scheduler"])
    # load_state_dict restores the schedule's position but not the optimizer's current lr, which
    # still holds step 0's value until the next scheduler.step(): set it to where the run was.
    for group, lr in zip(state.optimizer.param_groups, state.scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    return train


def load_full_model_state(job_dir: Path, like: nn.Module) -> dict[str, torch.Tensor]:
    """The newest checkpoint's model, unsharded into one process, shaped like `like`."""
    import torch.distributed.checkpoint as dcp

    found = complete_checkpoints(job_dir)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint under {job_dir / CHECKPOINTS}")
    state = {"model": {k: torch.empty_like(v) for k, v in like.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(found[-1][1]), no_dist=True)
    return state["model"]
