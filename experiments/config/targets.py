"""A config's `_target_` (a model's, a user's dataset's): located and called as Hydra does, each
failure one line naming the key, before any rank starts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from experiments.config.schema import ConfigError


def locate(key: str, target: str) -> Callable[..., Any]:
    """What `<key>._target_` names; one that does not import is a ConfigError naming it."""
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as e:
        cause = e.__cause__ or e
        raise ConfigError(
            f"{key}._target_={target} does not import ({type(cause).__name__}: {cause}); "
            "is its package on PYTHONPATH (or installed)?"
        ) from None


def call(what: str, target: str, args: Mapping[str, Any], given: Mapping[str, Any]) -> Any:
    """Hydra instantiates `target` with `args` as a partial (nested `_target_`s included, so a
    config's `_partial_` changes nothing); paralab completes the call with `given`. `what` names
    the config in the one line a raising constructor becomes."""
    from hydra.utils import instantiate

    try:
        return instantiate({"_target_": target, "_partial_": True, **args})(**given)
    except ConfigError:
        raise
    except Exception as e:
        # Hydra wraps what the nested instantiation raised; say that, not its wrapper.
        wrapped = e.__cause__ is not None and type(e).__name__ == "InstantiationException"
        cause = e.__cause__ if wrapped else e
        raise ConfigError(f"{what}: {target}(...) raised {type(cause).__name__}: {cause}") from None
