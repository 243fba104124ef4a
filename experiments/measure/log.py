"""Rank-prefixed logging: every rank writes to stderr and appends to the job's train.log."""

from __future__ import annotations

import logging
from pathlib import Path

LOG_FILE = "train.log"


def get_logger() -> logging.Logger:
    return logging.getLogger("paralab")


def file_logger() -> logging.Logger:
    """The same lines, to the job's log file only (while a progress bar owns the terminal)."""
    return logging.getLogger("paralab.file")


def setup_rank_logging(job_dir: Path, rank: int) -> logging.Logger:
    fmt = logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    # Appends are line-sized writes with O_APPEND, so lines from different ranks do not interleave.
    to_file = logging.FileHandler(job_dir / LOG_FILE, mode="a")
    for log, handlers in ((get_logger(), [logging.StreamHandler(), to_file]), (file_logger(), [to_file])):
        log.setLevel(logging.INFO)
        log.propagate = False  # Hydra's root handlers would print every line twice in launcher=local
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
        for h in handlers:
            h.setFormatter(fmt)
            log.addHandler(h)
    return get_logger()
