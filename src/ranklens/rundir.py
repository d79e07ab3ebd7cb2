"""Run directories: one per job, holding its resolved config, state, results, figures and report.

`open_run_dir(out, config, job)` locks the directory (``ranklens.lock``) and creates it with `config.yaml`, or reopens
it when it holds the same config (a rerun resumes or reuses), and refuses a directory that holds something else.
`check_output_dir` fails fast, before a model loads, when the directory cannot be written. Every file of a run is
written through ``ranklens.io`` (a temporary name, then a rename), so a killed job never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ranklens.config import Config
from ranklens.errors import RanklensError
from ranklens.io import atomic_write_text
from ranklens.lock import DirectoryLock

CONFIG_NAME = "config.yaml"


def check_output_dir(out: str | Path, option: str = "--out") -> Path:
    """Fail fast (before any model loads) when ``out`` cannot become a directory: a file is in the way, or the
    nearest existing directory is not writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RanklensError(f"{option} {str(out)!r} is a file; expected a directory")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise RanklensError(f"{option} {str(out)!r} lies under {str(existing)!r}, which is a file; expected a directory")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise RanklensError(f"{option} {str(out)!r}: {str(existing)!r} is not writable")
    return out


def _holds_only_config(out: Path) -> bool:
    """True for a directory a refused or failed-at-once run left: its config and nothing else."""
    return all(p.name == CONFIG_NAME or p.name.startswith(".") for p in out.iterdir())


def prepare_run_dir(out: str | Path, config: Config, job: str) -> Path:
    """Create or reopen the run directory of `job` with `config`; refuse one that holds another run (a directory
    holding only another config, from a run that stopped before doing anything, is taken over)."""
    out = check_output_dir(out)
    record = {"job": job, **config.model_dump(mode="json")}
    config_path = out / CONFIG_NAME
    if config_path.exists():
        existing = yaml.safe_load(config_path.read_text()) or {}
        if existing == record:
            return out
        if not _holds_only_config(out):
            keys = sorted(k for k in set(existing) | set(record) if existing.get(k) != record.get(k))
            diffs = ", ".join(f"{k}: {existing.get(k)!r} -> {record.get(k)!r}" for k in keys[:3])
            raise RanklensError(f"{str(out)!r} holds another run ({diffs}); expected an empty directory or one "
                                "made by the same command")
    elif out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise RanklensError(f"{str(out)!r} is not empty and holds no ranklens {job} run; expected an empty or "
                            "new directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, yaml.safe_dump(record, sort_keys=False))
    return out


@contextlib.contextmanager
def open_run_dir(out: str | Path, config: Config, job: str) -> Iterator[Path]:
    """``prepare_run_dir`` under the directory's lock (``ranklens.lock``), held until the block ends: a second
    process on the same directory is refused with the holder's PID."""
    out = check_output_dir(out)
    with DirectoryLock(out):
        yield prepare_run_dir(out, config, job)


def read_run_config(directory: str | Path, job: str) -> dict[str, Any]:
    """The resolved config a finished or running `job` recorded in its run directory (without the job name)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise RanklensError(f"{str(directory)!r} holds no {CONFIG_NAME}; expected a ranklens {job} run directory")
    record = yaml.safe_load(path.read_text()) or {}
    if record.get("job") != job:
        raise RanklensError(f"{str(directory)!r} holds a {record.get('job')!r} run; expected a {job} run")
    return {k: v for k, v in record.items() if k != "job"}
