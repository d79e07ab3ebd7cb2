"""Steps cached in a run directory: run each once, skip it when its result exists, continue a killed run.

A ``Step`` has a name, the exact config it runs with, the equivalent CLI commands, and a function that computes its
result (a JSON-ready dict) from a context. ``run_steps`` runs the steps in order:

- a step is done when ``DIR/steps/<name>.json`` exists; that file is written atomically (a temporary name, then a
  rename), so it is either complete or absent;
- a finished step is skipped and its recorded result reused; a step whose config changed is refused (the run
  directory as a whole is already bound to one config by ``prepare_run_dir``);
- a step interrupted by an exception or Ctrl-C records the seconds it ran in ``DIR/steps/<name>.partial.json``, and
  the rerun adds them to the wall time of the attempt that finishes it; the work inside a step is resumable on its
  own terms (an SAE run resumes from its checkpoint, a store from its last shard, the spectrum job from its
  accumulator checkpoint), so a killed run loses at most the work since those checkpoints.

Each step record holds ``name``, ``title``, ``config``, ``commands``, ``wall_seconds`` (all attempts),
``attempts`` and ``result``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ranklens.errors import RanklensError
from ranklens.io import atomic_write_json, read_json
from ranklens.reproduce.results_format import STEP_FORMAT, upgrade_step

STEPS_DIR = "steps"


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    run: Callable[[Any], dict[str, Any]]  # context -> JSON-ready result
    config: dict[str, Any] = field(default_factory=dict)
    commands: Sequence[str] = ()


def step_path(out: Path, name: str) -> Path:
    return Path(out) / STEPS_DIR / f"{name}.json"


def _partial_path(out: Path, name: str) -> Path:
    return Path(out) / STEPS_DIR / f"{name}.partial.json"


def _plain(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists), so configs compare equal across runs."""
    return json.loads(json.dumps(obj))


def load_step(out: Path, step: Step) -> dict[str, Any] | None:
    """The record of a finished step, or None; refuses a record made with another config."""
    path = step_path(out, step.name)
    if not path.exists():
        return None
    record = upgrade_step(read_json(path))
    if record.get("config") != _plain(step.config):
        raise RanklensError(f"step {step.name!r} in {str(out)!r} was made with another config; expected the same "
                            "run directory for the same command, or a new one")
    return record


def _placeless(obj: Any) -> Any:
    """`obj` without its ``store`` paths: the same store settings live in different run directories."""
    if isinstance(obj, dict):
        return {k: _placeless(v) for k, v in obj.items() if k != "store"}
    if isinstance(obj, list):
        return [_placeless(v) for v in obj]
    return obj


def finished_elsewhere(dirs: Sequence[str | Path], name: str, config: dict[str, Any], ignore: Sequence[str] = (),
                       ) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, result) of step `name` finished in each of the run directories `dirs` (``--reuse``, checked by
    ``ranklens.reproduce.job.check_reuse``) with `config`, the keys in `ignore` and store paths aside; a directory
    without that step, or with another config, gives nothing."""
    def comparable(c: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in _placeless(c).items() if k not in ignore}

    found = []
    wanted = comparable(_plain(config))
    for d in map(Path, dirs):
        path = step_path(d, name)
        if path.exists():
            record = upgrade_step(read_json(path))
            if comparable(record["config"]) == wanted:
                found.append((d, record["result"]))
    return found


def run_step(out: Path, step: Step, context: Any) -> dict[str, Any]:
    """Run one step (or reuse it) and return its record."""
    record = load_step(out, step)
    if record is not None:
        return record
    partial_path = _partial_path(out, step.name)
    earlier = read_json(partial_path) if partial_path.exists() else {"seconds": 0.0, "attempts": 0}
    start = time.monotonic()
    try:
        result = step.run(context)
    except BaseException:
        seconds = earlier["seconds"] + time.monotonic() - start
        atomic_write_json(partial_path, {"seconds": seconds, "attempts": earlier["attempts"] + 1})
        raise
    # A step whose runs are only known once it ran (they depend on an earlier step's result) returns its commands.
    commands = result.pop("commands", None) or list(step.commands)
    record = {"format": STEP_FORMAT, "name": step.name, "title": step.title, "config": _plain(step.config), "commands": commands,
              "wall_seconds": earlier["seconds"] + time.monotonic() - start, "attempts": earlier["attempts"] + 1,
              "finished": datetime.now(UTC).isoformat(timespec="seconds"), "result": result}
    atomic_write_json(step_path(out, step.name), record)
    partial_path.unlink(missing_ok=True)
    return record


def run_steps(out: Path, steps: Sequence[Step], context: Any, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run the steps in order (each sees the records of those before it in ``context.records``)."""
    records: dict[str, dict[str, Any]] = {}
    context.records = records
    for i, step in enumerate(steps, 1):
        done = step_path(out, step.name).exists()
        if progress:
            print(f"[{i}/{len(steps)}] {step.title}" + (" (cached)" if done else ""), file=sys.stderr, flush=True)
        records[step.name] = run_step(out, step, context)
    return records
