"""Keys that would do nothing: unknown ones (`+foo=1`), and strategy keys the chosen strategy does
not read. One rule: a strategy key set on the command line, or off its default, that the strategy
does not use is an error, not a silent no-op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from experiments.config.schema import Config, ConfigError, StrategyConfig

# strategy key -> whether a strategy reads it, from its registry traits; `reads` names the rest.
STRATEGY_KEY_USERS: dict[str, Callable[[object], bool]] = {
    "tp": lambda spec: "tp" in spec.configured,
    "pp": lambda spec: "pp" in spec.configured,
    "dp_replicate": lambda spec: "dp_replicate" in spec.configured,
    "cp": lambda spec: "cp" in spec.configured,
    "ep": lambda spec: "ep" in spec.configured,
    # DistributedDataParallel (ddp, zero1, ddp_pp).
    "bucket_cap_mb": lambda spec: spec.wraps_ddp,
    "gradient_as_bucket_view": lambda spec: spec.wraps_ddp,
    # FSDP2 shards over dp_shard (fsdp, zero2, zero3, hsdp, fsdp_tp, fsdp_tp_pp).
    "reshard_after_forward": lambda spec: spec.fill == "dp_shard",
    "mp_param_dtype": lambda spec: spec.fill == "dp_shard",
    "mp_reduce_dtype": lambda spec: spec.fill == "dp_shard",
    "offload": lambda spec: spec.fill == "dp_shard",
    "sequence_parallel": lambda spec: spec.needs_tp_plan,
    "schedule": lambda spec: spec.pipelined,
    "microbatches": lambda spec: spec.pipelined,
    "stages_per_rank": lambda spec: spec.pipelined,
}


def reads(spec, key: str) -> bool:
    implied = STRATEGY_KEY_USERS.get(key)
    return key in spec.reads or (implied is not None and implied(spec))


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The keys named by command-line overrides ("+strategy.tp=2" -> "strategy.tp")."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]


def check_known(cfg: DictConfig) -> None:
    """`+foo=1` adds a key the schema does not have; Hydra allows it, so say it here."""
    try:
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg, resolve=True))
    except ConfigKeyError as e:
        raise ConfigError(
            f"{e.full_key} is not a paralab key; `python train.py --help` lists every key"
        ) from None


def check_used(cfg: Config, explicit: Iterable[str] = ()) -> None:
    """Every strategy key set on the command line or off its default must be one the strategy reads."""
    from parallel.registry import STRATEGIES, get_spec

    explicit = set(explicit)
    s = cfg.strategy
    spec = get_spec(s.name)
    default = StrategyConfig(name=s.name)
    for key in (f.name for f in dataclasses.fields(StrategyConfig) if f.name != "name"):
        value = getattr(s, key)
        if (value != getattr(default, key) or f"strategy.{key}" in explicit) and not reads(spec, key):
            users = [n for n, sp in STRATEGIES.items() if reads(sp, key)]
            raise ConfigError(
                f"strategy={s.name} does not use strategy.{key}={_show(value)}; drop it, or pick a "
                f"strategy that does ({', '.join(users)})"
            )


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
