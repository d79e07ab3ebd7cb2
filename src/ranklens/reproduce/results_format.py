"""Versions of what a reproduce run records, and the reading of older ones.

Format 2 (``ranklens.reproduce/2``) uses the metric keys of ``ranklens.eval.metrics`` everywhere: ``fvu`` (``nmse``
kept beside it for this version), ``train_dead`` / ``train_dead_fraction`` with ``dead_window_tokens``, and
``eval_dead`` / ``eval_dead_fraction`` with ``eval_tokens``. Format 1 step records and results.json files are read
by renaming their keys (``upgrade_result``, ``read_results``).

Additions that need no new version: each verdict's ``id`` (a name of its claim that stays the same across presets,
``asi.k_main.fvu.TopK``; older verdicts have none, and ``ranklens.reproduce.report.reference_verdicts`` recovers it),
and ``reference`` in results.json: the reference run it was compared with and the verdicts that differ from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranklens.eval.metrics import upgrade_metrics
from ranklens.io import read_json

RESULTS_FORMAT = "ranklens.reproduce/2"
STEP_FORMAT = 2
_POINT_RENAMES = {"dead_fraction": "train_dead_fraction", "nmse": "fvu"}  # experiment 3's points, format 1


def upgrade_result(result: Any) -> Any:
    """A step result of format 1 with today's keys: every run's ``metrics`` upgraded, and experiment 3's points."""
    if isinstance(result, list):
        return [upgrade_result(x) for x in result]
    if not isinstance(result, dict):
        return result
    out = {k: upgrade_result(v) for k, v in result.items()}
    if isinstance(out.get("metrics"), dict):
        out["metrics"] = upgrade_metrics(out["metrics"])
    if "effective_rank" in out and "run" in out:  # a point of the dead-feature sweep
        out = {_POINT_RENAMES.get(k, k): v for k, v in out.items()}
    return out


def upgrade_step(record: dict[str, Any]) -> dict[str, Any]:
    """A step record (DIR/steps/<name>.json, or a step of results.json) in format 2."""
    if record.get("format", 1) >= STEP_FORMAT:
        return record
    return {**record, "format": STEP_FORMAT, "result": upgrade_result(record.get("result"))}


def read_results(path: str | Path) -> dict[str, Any]:
    """A results.json of any format, in format 2 (verdicts are kept as they were computed)."""
    results = read_json(path)
    if results.get("format") == RESULTS_FORMAT:
        return results
    return {**results, "format": RESULTS_FORMAT, "read_from_format": results.get("format"),
            "steps": {name: upgrade_step(step) for name, step in results.get("steps", {}).items()}}
