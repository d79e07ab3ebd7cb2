"""What the SAE experiments (3-7) share: a step that trains a list of cells, and reading metrics back by cell.

A step's result holds every run's metrics (``runs``: name -> cell, run directory, metrics.json content) and the
experiment's own layout of those names (which runs form which group), so its verdicts and figures are computed from
the record alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Cell, Plan

# Lower-is-better metrics compared across methods (App. H: dead features, normalized MSE, Delta LM loss).
METRICS = {"train_dead_fraction": "dead fraction", "fvu": "FVU", "delta_lm_loss": "Delta LM loss"}


def sae_step(name: str, title: str, plan: Plan, cells: Sequence[Cell], layout: dict[str, Any],
             extra: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None) -> Step:
    """A step training `cells` (shared ones once); `extra(ctx, runs)` may add to the result."""
    unique = list(dict.fromkeys(cells))
    config = {"layout": layout, "sae_runs": {c.name: plan.sae_config(c).model_dump(mode="json") for c in unique}}

    def run(ctx) -> dict[str, Any]:
        metrics = ctx.train_all(unique)
        runs = {c.name: {"cell": asdict(c), "dir": f"sae/{c.name}", "metrics": metrics[c.name]} for c in unique}
        result = {"layout": layout, "runs": runs}
        if extra is not None:
            result.update(extra(ctx, runs))
        return result

    return Step(name, title, run, config, [plan.sae_command(c) for c in unique])


def names(cells: Sequence[Cell]) -> list[str]:
    return [c.name for c in cells]


def values(result: dict[str, Any], run_names: Sequence[str], metric: str) -> list[float]:
    """The metric of each named run (missing or non-finite values left out)."""
    out = []
    for n in run_names:
        v = result["runs"][n]["metrics"].get(metric)
        if v is not None and math.isfinite(float(v)):
            out.append(float(v))
    return out


def has_metric(result: dict[str, Any], metric: str) -> bool:
    return any(r["metrics"].get(metric) is not None for r in result["runs"].values())


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan std for one value; nan for none)."""
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")


def fmt_mean_std(xs: Sequence[float]) -> str:
    m, s = mean_std(xs)
    if math.isnan(m):
        return "\u2014"
    return f"{m:.4g}" + ("" if math.isnan(s) else f" \u00b1 {s:.2g}")
