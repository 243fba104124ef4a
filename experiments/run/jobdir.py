"""A rejected job changes nothing on disk: what a previous run wrote in its dir stays as it was.

Hydra creates the job dir, appends to its `train.log` and rewrites `.hydra/` before paralab sees
the config. So a Hydra callback notes, before any of that, which job dirs already exist and what
Hydra will touch in them; a rejected job then restores exactly that (or removes a dir Hydra made).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.config.ranges import has_control_char
from experiments.config.schema import ConfigError

HYDRA_SUBDIR = ".hydra"
HYDRA_LOG = "train.log"  # Hydra's job log, named after the script; paralab's ranks append to it too


@dataclass
class Before:
    hydra_files: dict[str, bytes] = field(default_factory=dict)
    had_hydra_dir: bool = False
    log_size: int | None = None  # None: there was no train.log


# job dir (absolute) -> what it held before this process; absent: Hydra is creating it now.
_existing: dict[Path, Before] = {}
_watched: list[Path] = []  # the run dir, or the sweep dir whose children are job dirs
_made_sweep_dirs: list[Path] = []


def _note(job_dir: Path) -> None:
    if not job_dir.is_dir():
        return
    hydra = job_dir / HYDRA_SUBDIR
    log = job_dir / HYDRA_LOG
    _existing[job_dir.resolve()] = Before(
        hydra_files={p.name: p.read_bytes() for p in hydra.glob("*") if p.is_file()},
        had_hydra_dir=hydra.is_dir(),
        log_size=log.stat().st_size if log.is_file() else None,
    )


class JobDirGuard(Callback):
    """Registered in conf/config.yaml (hydra.callbacks): runs before Hydra touches any job dir."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        _watched.append(run_dir.resolve())
        _note(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        _watched.append(sweep_dir.resolve())
        if not sweep_dir.exists():
            _made_sweep_dirs.append(sweep_dir.resolve())
        if sweep_dir.is_dir():
            for child in sweep_dir.iterdir():
                _note(child)


def check_name(job_dir: Path) -> None:
    """A newline in the job dir would be a line of its own in logs and in the scripts that carry it."""
    if has_control_char(str(job_dir)):
        raise ConfigError(
            f"hydra.run.dir / hydra.sweep.dir {str(job_dir)!r} holds a control character; remove it"
        )


def undo_hydra(job_dir: Path) -> None:
    """Leave `job_dir` as it was before this process: remove it if Hydra made it, else put back
    `.hydra/` and cut `train.log` to its old length. Unknown dirs (no callback ran) are left alone."""
    job_dir = job_dir.resolve()
    before = _existing.get(job_dir)
    if before is None:
        if any(job_dir == w or job_dir.parent == w for w in _watched):
            shutil.rmtree(job_dir, ignore_errors=True)
        return
    hydra = job_dir / HYDRA_SUBDIR
    if not before.had_hydra_dir:
        shutil.rmtree(hydra, ignore_errors=True)
    else:
        for p in hydra.glob("*"):
            if p.is_file() and p.name not in before.hydra_files:
                p.unlink()
        for name, data in before.hydra_files.items():
            (hydra / name).write_bytes(data)
    log = job_dir / HYDRA_LOG
    if before.log_size is None:
        log.unlink(missing_ok=True)
    elif log.is_file() and log.stat().st_size > before.log_size:
        with open(log, "r+b") as f:
            f.truncate(before.log_size)


def undo_sweep() -> None:
    """Every job was rejected: remove the sweep dir too, if Hydra made it."""
    for d in _made_sweep_dirs:
        shutil.rmtree(d, ignore_errors=True)


def swept_keys(argv: list[str], sweeper_params: Mapping[str, object] | None) -> list[str]:
    """Keys this sweep varies: sweep overrides on the command line, then hydra.sweeper.params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keys: list[str] = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - Hydra reports bad overrides itself, with context
            continue
        if override.is_sweep_override():
            keys.append(override.get_key_element().lstrip("+~"))
    keys += [k for k in (sweeper_params or {}) if k not in keys]
    return keys
