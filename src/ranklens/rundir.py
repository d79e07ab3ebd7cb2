"""Run directories: one per job, holding its resolved config, state, results, figures and report.

`prepare_run_dir(out, config)` creates the directory with `config.yaml`, or reopens it when it holds the same
config (a rerun resumes or reuses), and refuses a directory that holds something else. Every file of a run is
written through ``ranklens.io`` (a temporary name, then a rename), so a killed job never leaves a half-written file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ranklens.config import Config
from ranklens.errors import RanklensError
from ranklens.io import atomic_write_text

CONFIG_NAME = "config.yaml"


def prepare_run_dir(out: str | Path, config: Config, job: str) -> Path:
    """Create or reopen the run directory of `job` with `config`; refuse one that holds another run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RanklensError(f"output path {str(out)!r} is a file; expected a directory for the run")
    record = {"job": job, **config.model_dump(mode="json")}
    config_path = out / CONFIG_NAME
    if config_path.exists():
        existing = yaml.safe_load(config_path.read_text()) or {}
        if existing != record:
            keys = sorted(k for k in set(existing) | set(record) if existing.get(k) != record.get(k))
            diffs = ", ".join(f"{k}: {existing.get(k)!r} -> {record.get(k)!r}" for k in keys[:3])
            raise RanklensError(f"{str(out)!r} holds another run ({diffs}); expected an empty directory or one "
                                "made by the same command")
        return out
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise RanklensError(f"{str(out)!r} is not empty and holds no ranklens {job} run; expected an empty or "
                            "new directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, yaml.safe_dump(record, sort_keys=False))
    return out


def read_run_config(directory: str | Path, job: str) -> dict[str, Any]:
    """The resolved config a finished or running `job` recorded in its run directory (without the job name)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise RanklensError(f"{str(directory)!r} holds no {CONFIG_NAME}; expected a ranklens {job} run directory")
    record = yaml.safe_load(path.read_text()) or {}
    if record.get("job") != job:
        raise RanklensError(f"{str(directory)!r} holds a {record.get('job')!r} run; expected a {job} run")
    return {k: v for k, v in record.items() if k != "job"}
