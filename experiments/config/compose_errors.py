"""Hydra's compose errors (a wrong key, value or option) as paralab's one line and exit code 2."""

from __future__ import annotations

import re

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def compose_error_line(e: BaseException) -> str:
    """ "Error merging override train.precision=fp16: Invalid value 'fp16', expected one of [fp32, bf16]"."""
    text = str(e)
    parts = [re.sub(r"^In '[^']*': ", "", _first_line(e))]
    if e.__cause__ is not None:
        parts.append(_first_line(e.__cause__))
    options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", text)
    if options:
        parts.append(f"{options.group(1)} options: {', '.join(o.strip() for o in options.group(2).split())}")
    return "; ".join(p.rstrip(".") for p in parts)
