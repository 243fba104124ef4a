"""Hydra's compose errors (a wrong key, value or option) as paralab's one line and exit code 2."""

from __future__ import annotations

import dataclasses
import difflib
import re

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _in_a_config_file(text: str) -> str | None:
    """An error inside a group's config file (a user's own, found through hydra.searchpath, say):
    Hydra's first line names only the exception; the file, the key and its schema follow."""
    m = re.match(r"In '([^']+)': (\w+) raised while composing config:\n(.*)", text, re.S)
    if not m:
        return None
    where, kind, rest = m.groups()
    detail = _first_line(Exception(rest)) if rest.strip() else kind
    line = f"in config file {where}.yaml: {detail.rstrip('.')}"
    full_key = re.search(r"full_key: (\S+)", rest)
    if full_key:
        line += f" ({full_key.group(1)})"
    key = re.search(r"Key '([^']+)' not in '(\w+)'", rest)
    if key:
        from experiments.config import schema

        node = getattr(schema, key.group(2), None)
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        close = difflib.get_close_matches(key.group(1), names, n=1)
        line += f"; did you mean {close[0]}?" if close else f"; its keys are {', '.join(names)}"
    return line


def compose_error_line(e: BaseException) -> str:
    """ "Error merging override train.precision=fp16: Invalid value 'fp16', expected one of [fp32, bf16]"."""
    text = str(e)
    in_file = _in_a_config_file(text)
    if in_file is not None:
        return in_file
    parts = [re.sub(r"^In '[^']*': ", "", _first_line(e))]
    if e.__cause__ is not None:
        parts.append(_first_line(e.__cause__))
    options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", text)
    if options:
        parts.append(f"{options.group(1)} options: {', '.join(o.strip() for o in options.group(2).split())}")
    return "; ".join(p.rstrip(".") for p in parts)
