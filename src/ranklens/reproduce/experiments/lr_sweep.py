"""The learning-rate sweep that sets experiment 9's learning rate (run when ``lr_sweep`` lists values).

App. E.1 gives 4e-5 for 800M tokens; shorter runs at the same batch want a larger rate, and which one is an empirical
question for this model and budget. Each value trains TopK and ASI (the run's d_init) at the middle layer's attention
output for ``lr_sweep_tokens`` tokens with the first seed and the run's batch; the chosen rate is the one with the
lowest mean held-out FVU over the two methods (ties: the smaller rate). No verdicts: this step only chooses. A run
with ``--reuse`` takes the sweep of a directory that ran it with the same settings (seeds split over jobs).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ranklens.report.html import Report
from ranklens.reproduce.experiments.sae_runs import sae_step
from ranklens.reproduce.pipeline import Step, finished_elsewhere
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.verdicts import Verdict

NAME = "lr_sweep"
TITLE = "Learning-rate sweep for experiment 9"
METHODS = ("TopK", "ASI")


def step(plan: Plan) -> Step:
    c = plan.cfg
    grid = {f"{lr:g}": {m: plan.cell(m, tokens=c.lr_sweep_tokens, lr=lr) for m in METHODS} for lr in c.lr_sweep}
    layout = {"site": plan.main_site, "tokens": c.lr_sweep_tokens,
              "grid": {lr: {m: cell.name for m, cell in ms.items()} for lr, ms in grid.items()}}

    def choose(ctx, runs: dict[str, Any]) -> dict[str, Any]:
        return {"chosen_lr": chosen_lr({"layout": layout, "runs": runs})}

    sweep = sae_step(NAME, TITLE, plan, [cell for ms in grid.values() for cell in ms.values()], layout, extra=choose)

    def run(ctx) -> dict[str, Any]:
        """The sweep of a --reuse directory with the same settings, or a new one."""
        for _, result in finished_elsewhere(c.reuse, NAME, sweep.config):
            return result
        return sweep.run(ctx)

    return replace(sweep, run=run)


def mean_fvu(result: dict[str, Any]) -> dict[str, float]:
    """Per learning rate, the mean held-out FVU of its runs."""
    return {lr: float(np.mean([result["runs"][n]["metrics"]["fvu"] for n in ms.values()]))
            for lr, ms in result["layout"]["grid"].items()}


def chosen_lr(result: dict[str, Any]) -> float:
    fvu = mean_fvu(result)
    return float(min(fvu, key=lambda lr: (fvu[lr] if fvu[lr] == fvu[lr] else float("inf"), float(lr))))


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    return []


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    lay = result["layout"]
    fvu = mean_fvu(result)
    rows = [[lr] + [result["runs"][ms[m]]["metrics"]["fvu"] for m in METHODS] + [fvu[lr]]
            for lr, ms in lay["grid"].items()]
    rep.table(["learning rate", *(f"FVU {m}" for m in METHODS), "mean"], rows, number_format=".4f",
              caption=f"{lay['site']}, {lay['tokens']:,} training tokens per run, the run's first seed; chosen: "
                      f"{result['chosen_lr']:g} (lowest mean held-out FVU)")
    rates = sorted(float(lr) for lr in lay["grid"])
    if len(rates) > 1 and result["chosen_lr"] in (rates[0], rates[-1]):
        side = "largest" if result["chosen_lr"] == rates[-1] else "smallest"
        rep.paragraph(f"The chosen rate is the {side} one tried: the best rate for this budget may lie beyond the "
                      "grid, and a wider sweep would tell.")
