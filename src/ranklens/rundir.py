"""Run directories: one per job, holding its resolved config, state, results, figures and report.

`prepare_run_dir(out, config)` creates the directory with `config.yaml`, or reopens it when it holds the same
config (a rerun resumes or reuses), and refuses a directory that holds something else. Writes go through
`atomic_write_*` (a temporary name in the same directory, then a rename), so a killed job never leaves a
half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ranklens.config import Config
from ranklens.errors import RanklensError

CONFIG_NAME = "config.yaml"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RanklensError(f"{str(path)!r} is not valid JSON ({err.msg} at line {err.lineno})") from err


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
