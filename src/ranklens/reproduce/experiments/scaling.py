"""Experiment 6: scaling the dictionary, and SparseAdam (Section 5.3, Figure 8; App. M).

TopK, AuxK, ASI and ASI with SparseAdam at every dictionary size of the preset (multiples of d, from 2x to at least
32x), one seed each as in Figure 8, at the middle layer's attention output, all on the same store and token budget.

Verdicts (sign tests over the sizes):
- ASI reaches a lower FVU than TopK, and than AuxK (Figure 8A);
- ASI with SparseAdam leaves fewer dead features than ASI with Adam (Figure 8B);
- ASI uses its alive features more efficiently than AuxK (Figure 8C): at each size, ASI's FVU is below the FVU AuxK
  reaches with the same number of alive features (AuxK's FVU against alive features, interpolated on log scales;
  sizes outside AuxK's range are left out).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ranklens.report.html import Report
from ranklens.reproduce import figures as rfig
from ranklens.reproduce.experiments.sae_runs import sae_step
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, sign_test

NAME = "scaling"
TITLE = "6. Scaling the dictionary, and SparseAdam (Figure 8)"
METHODS = ("TopK", "AuxK", "ASI", "ASI + SparseAdam")


def step(plan: Plan) -> Step:
    c = plan.cfg
    grid = {str(e): {m: plan.cell(m, expansion=e, tokens=c.scaling_tokens) for m in METHODS}
            for e in sorted(set(c.scaling_expansions))}
    layout = {"site": plan.main_site, "d": plan.shape.d_model,
              "grid": {e: {m: cell.name for m, cell in ms.items()} for e, ms in grid.items()}}
    return sae_step(NAME, TITLE, plan, [cell for ms in grid.values() for cell in ms.values()], layout)


def _table(result: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> expansion -> {n_features, alive, fvu, train_dead_fraction}."""
    out: dict[str, dict[str, dict[str, float]]] = {m: {} for m in METHODS}
    for e, ms in result["layout"]["grid"].items():
        for m, run in ms.items():
            x = result["runs"][run]["metrics"]
            out[m][e] = {"n_features": x["n_features"], "alive": x["n_features"] - x["train_dead"],
                         "fvu": x["fvu"], "train_dead_fraction": x["train_dead_fraction"]}
    return out


def _interp_loglog(x: float, xs: list[float], ys: list[float]) -> float:
    """y at x on the piecewise-linear log-log curve through (xs, ys); nan outside its range."""
    pts = sorted((a, b) for a, b in zip(xs, ys, strict=True) if a > 0 and b > 0)
    if len(pts) < 2 or x <= 0 or not pts[0][0] <= x <= pts[-1][0]:
        return float("nan")
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.exp(np.interp(math.log(x), lx, ly)))


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    t = _table(result)
    sizes = sorted(t["ASI"], key=int)
    labels = [f"{e}x" for e in sizes]
    out = [sign_test(f"ASI reaches a lower FVU than {other} at each dictionary size (Figure 8A)",
                     [t["ASI"][e]["fvu"] < t[other][e]["fvu"] for e in sizes], units="sizes", alpha=alpha,
                     labels=labels).named(f"scaling.fvu.{other}") for other in ("TopK", "AuxK")]
    out.append(sign_test("SparseAdam leaves fewer dead features than Adam with ASI at each size (Figure 8B)",
                         [t["ASI + SparseAdam"][e]["train_dead_fraction"] < t["ASI"][e]["train_dead_fraction"] for e in sizes],
                         units="sizes", alpha=alpha, labels=labels).named("scaling.sparseadam_dead"))
    aux = t["AuxK"]
    pairs = []
    for e in sizes:
        ref = _interp_loglog(t["ASI"][e]["alive"], [aux[s]["alive"] for s in aux], [aux[s]["fvu"] for s in aux])
        if not math.isnan(ref):
            pairs.append((e, t["ASI"][e]["fvu"] < ref))
    out.append(sign_test("ASI reaches a lower FVU than AuxK with the same number of alive features (Figure 8C)",
                         [ok for _, ok in pairs], units=f"sizes within AuxK's range of alive features (of {len(sizes)})",
                         alpha=alpha, labels=[f"{e}x" for e, _ in pairs]).named("scaling.fvu_same_alive"))
    return out


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    t = _table(result)
    some = result["runs"][next(iter(result["runs"]))]["metrics"]
    rep.paragraph(f"{result['layout']['site']}: dictionaries of {', '.join(f'{e}x' for e in sorted(t['ASI'], key=int))}"
                  f" d = {result['layout']['d']}, {some['tokens']:,} training tokens each, one seed.")

    def series(key: str, x: str = "n_features") -> dict[str, list[tuple[float, float, float]]]:
        return {m: [(v[x], v[key], float("nan")) for v in t[m].values()] for m in METHODS}

    panels = [rfig.Panel("FVU", "features", series("fvu"), logx=True),
              rfig.Panel("dead fraction", "features", series("train_dead_fraction"), logx=True),
              rfig.Panel("FVU", "alive features", series("fvu", "alive"), logx=True)]
    rep.add_figure(rfig.metric_panels, (panels,), fig_dir / "fig8_scaling.png",
               "A: FVU against dictionary size; B: dead fraction; C: FVU against alive features (cf. Figure 8).")
    rows = [[f"{e}x", int(v["n_features"])] + [t[m][e][key] for m in METHODS for key in ("fvu", "train_dead_fraction")]
            for e, v in sorted(t["TopK"].items(), key=lambda kv: int(kv[0]))]
    headers = ["size", "features"] + [f"{m} {key}" for m in METHODS for key in ("FVU", "dead")]
    rep.table(headers, rows, number_format={h: ".2%" for h in headers if h.endswith(" dead")})
    verdict_blocks(rep, found)
