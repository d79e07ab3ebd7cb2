"""Experiment 5: controls (App. J.1, J.2).

- J.1: the random-subspace init (the same d_init as ASI, a uniformly random subspace instead of the active one)
  against ASI, at the middle layer's attention output.
- J.2: ASI against the standard init on the middle layer's residual stream, which is closer to full rank.

All cells use the preset's size, k and seeds; the attention-output TopK and ASI cells are shared with experiment 4.

Verdicts: ASI beats the random subspace on dead features, FVU and Delta LM loss (one-sided Welch tests: only the
active subspace helps, J.1); ASI's relative FVU gain over TopK is smaller on the residual stream than on the attention
output (Welch over seeds of 1 - FVU_ASI / FVU_TopK, paired by seed, J.2: "ASI yields minimal gains"); and a TopK SAE on
the residual stream leaves fewer dead features than on the attention output (J.2: "these activations inherently
exhibit a lower rate of dead features").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranklens.report.html import Report
from ranklens.reproduce import figures as rfig
from ranklens.reproduce.experiments.sae_runs import (
    METRICS,
    fmt_mean_std,
    has_metric,
    mean_std,
    names,
    sae_step,
    values,
)
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, welch_less

NAME = "controls"
TITLE = "5. Controls: random subspace and the residual stream (App. J.1, J.2)"


def step(plan: Plan) -> Step:
    groups = {
        "attn ASI": plan.cells("ASI"), "attn TopK": plan.cells("TopK"), "attn random": plan.cells("random subspace"),
        "resid ASI": plan.cells("ASI", site=plan.resid_site), "resid TopK": plan.cells("TopK", site=plan.resid_site),
    }
    layout = {"attn_site": plan.main_site, "resid_site": plan.resid_site,
              "groups": {g: names(cs) for g, cs in groups.items()}}
    return sae_step(NAME, TITLE, plan, [c for cs in groups.values() for c in cs], layout)


def _gains(result: dict[str, Any], asi: list[str], topk: list[str]) -> list[float]:
    """1 - FVU_ASI / FVU_TopK per seed (the groups list their runs in seed order)."""
    a, t = values(result, asi, "fvu"), values(result, topk, "fvu")
    return [1 - x / y for x, y in zip(a, t, strict=False)]


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    g = result["layout"]["groups"]
    out = [welch_less(f"ASI has a lower {label} than the random-subspace init of the same d_init (App. J.1)",
                      values(result, g["attn ASI"], metric), values(result, g["attn random"], metric),
                      name_a="ASI", name_b="random subspace", alpha=alpha).named(f"controls.random.{metric}")
           for metric, label in METRICS.items() if has_metric(result, metric)]
    out.append(welch_less("ASI's relative FVU gain over TopK is smaller on the residual stream than on the attention "
                          "output (App. J.2)", _gains(result, g["resid ASI"], g["resid TopK"]),
                          _gains(result, g["attn ASI"], g["attn TopK"]), name_a="gain on resid_post",
                          name_b="gain on attn_out", alpha=alpha, margin=0.0).named("controls.resid_gain"))
    out.append(welch_less("With the standard init, the residual stream leaves fewer dead features than the attention "
                          "output (App. J.2)", values(result, g["resid TopK"], "train_dead_fraction"),
                          values(result, g["attn TopK"], "train_dead_fraction"), name_a="resid_post",
                          name_b="attn_out", alpha=alpha).named("controls.resid_dead"))
    return out


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    lay = result["layout"]
    g = lay["groups"]
    metrics = {m: label for m, label in METRICS.items() if has_metric(result, m)}
    d_init = result["runs"][g["attn ASI"][0]]["metrics"]["d_init"]
    rep.paragraph(f"Random subspace and ASI both with d_init = {d_init} on {lay['attn_site']}; ASI and the standard "
                  f"init on {lay['resid_site']}; {len(g['attn ASI'])} seeds per cell.")
    groups = {label: {name: mean_std(values(result, g[key], metric)) for name, key in
                      (("TopK", "attn TopK"), ("ASI", "attn ASI"), ("random subspace", "attn random"))}
              for metric, label in metrics.items()}
    rep.add_figure(rfig.grouped_bars, ({k: v for k, v in groups.items() if k != METRICS["delta_lm_loss"]},
                                        "value"), fig_dir / "fig12_random_subspace.png",
               f"{lay['attn_site']}: dead fraction and FVU of the standard init, ASI and the random-subspace init "
               "(mean \u00b1 std over seeds) (cf. Figure 12).")
    rows = [[key] + [fmt_mean_std(values(result, names_, metric)) for metric in metrics] for key, names_ in g.items()]
    rep.table(["cell", *metrics.values()], rows, caption="Mean \u00b1 std over seeds (cf. Figures 12, 13)")
    verdict_blocks(rep, found)
