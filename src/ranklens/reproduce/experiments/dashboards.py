"""The dashboards of one TopK SAE, one ASI SAE and one Lorsa of the run (``ranklens dashboard``), linked from the
report, so a reader can look at what the compared dictionaries learned. No verdicts: this step only shows.

The dictionaries are the first seed's cells of experiments 4 and 8 (trained here if those experiments did not run);
each dashboard scans ``dashboard_tokens`` held-out tokens of its run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ranklens.dashboard.build import build_dashboard
from ranklens.dashboard.config import DashboardConfig
from ranklens.report.html import Report
from ranklens.reproduce.experiments import lorsa
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.verdicts import Verdict
from ranklens.train.lorsa_job import train_lorsa

NAME = "dashboards"
TITLE = "Dashboards: what a TopK SAE, an ASI SAE and a Lorsa learned"
DIR = "dashboards"


def step(plan: Plan) -> Step:
    c = plan.cfg
    sae_cells = {"TopK": plan.cell("TopK"), "ASI": plan.cell("ASI")}
    lorsa_cell = lorsa.cells(plan)["asi"][0]
    dash = DashboardConfig(tokens=c.dashboard_tokens, dtype=c.dtype, device=c.device)
    config = {"tokens": c.dashboard_tokens, "sae": {k: x.name for k, x in sae_cells.items()},
              "lorsa": lorsa_cell.name}

    def run(ctx) -> dict[str, Any]:
        built = {}
        for label, cell in sae_cells.items():
            ctx.train(cell)
            built[f"{label} SAE"] = build_dashboard(plan.sae_dir(cell), dash, plan.out / DIR / label.lower(),
                                                    progress=ctx.progress)
        run_dir = plan.out / "lorsa" / lorsa_cell.name
        train_lorsa(lorsa.lorsa_config(plan, lorsa_cell), run_dir, progress=ctx.progress, lm=ctx.lm)
        built["ASI Lorsa"] = build_dashboard(run_dir, dash, plan.out / DIR / "lorsa", progress=ctx.progress)
        return {"sites": {label: os.path.relpath(site / "index.html", plan.out) for label, site in built.items()},
                "sources": {"TopK SAE": f"sae/{sae_cells['TopK'].name}", "ASI SAE": f"sae/{sae_cells['ASI'].name}",
                            "ASI Lorsa": f"lorsa/{lorsa_cell.name}"}}

    commands = [f"ranklens dashboard {plan.sae_dir(x)} --tokens {c.dashboard_tokens} --out {plan.out / DIR / k.lower()}"
                for k, x in sae_cells.items()]
    commands.append(f"ranklens dashboard {plan.out / 'lorsa' / lorsa_cell.name} --tokens {c.dashboard_tokens} "
                    f"--out {plan.out / DIR / 'lorsa'}")
    return Step(NAME, TITLE, run, config, commands)


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    return []


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    rep.paragraph("Each link opens a static site (from disk; `ranklens serve DIR` adds a prompt box) with a table of "
                  "every feature and a page per feature: top activating contexts, samples from activation intervals, "
                  "logit effects, nearest features, and for the Lorsa the z-patterns and head attribution.")
    rep.links([(f"{label} ({result['sources'][label]})", href) for label, href in result["sites"].items()])
