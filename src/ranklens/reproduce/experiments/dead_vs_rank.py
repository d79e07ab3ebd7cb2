"""Experiment 3: dead features follow effective rank (Section 5.1; Figure 5; App. F, Tables 1-3).

One standard-init TopK SAE of one size (the preset's expansion and k, one seed) on the attention output, MLP output
and residual stream of each sampled layer (every layer in the paper preset), all trained on one activation store.
The effective rank of each site comes from experiment 1's spectrum job.

Verdicts: the dead-feature fraction falls as effective rank rises (Spearman rank correlation over the sites, one-sided
permutation p-value), and attention outputs leave more dead features than the residual stream of the same layer
(App. F: "attention outputs consistently show substantially higher dead-feature ratios than residual streams"; sign
test over the layers where the two differ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranklens.report.html import Report
from ranklens.reproduce import figures as rfig
from ranklens.reproduce.experiments import low_rank
from ranklens.reproduce.experiments.sae_runs import sae_step
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, sign_test, spearman_negative

NAME = "dead_vs_rank"
TITLE = "3. Dead features follow effective rank (Figure 5, App. F)"


def step(plan: Plan) -> Step:
    cells = {site: plan.cell("TopK", site=site) for site in plan.sweep_sites}

    def erank(ctx, runs) -> dict[str, Any]:
        spectrum = {r["site"]: r for r in ctx.records[low_rank.NAME]["result"]["records"]}
        return {"points": [{"site": site, "layer": spectrum[site]["layer"], "kind": spectrum[site]["kind"],
                            "effective_rank": spectrum[site]["effective_rank"],
                            "train_dead_fraction": runs[cell.name]["metrics"]["train_dead_fraction"],
                            "dead_window_tokens": runs[cell.name]["metrics"]["dead_window_tokens"],
                            "fvu": runs[cell.name]["metrics"]["fvu"], "run": cell.name}
                           for site, cell in cells.items()]}

    layout = {"sites": {site: cell.name for site, cell in cells.items()}, "layers": plan.sweep_layers}
    return sae_step(NAME, TITLE, plan, list(cells.values()), layout, erank)


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    points = result["points"]
    out = [spearman_negative("The lower a site's effective rank, the more dead features a standard TopK SAE leaves "
                             "(Figure 5, right)", [p["effective_rank"] for p in points],
                             [p["train_dead_fraction"] for p in points], name_x="effective rank",
                             name_y="dead fraction", alpha=alpha).named("dead_vs_rank.spearman")]
    by = {(p["layer"], p["kind"]): p["train_dead_fraction"] for p in points}
    pairs = [(layer, by[(layer, "attn_out")], by[(layer, "resid_post")]) for layer in sorted({p["layer"] for p in points})
             if (layer, "attn_out") in by and (layer, "resid_post") in by]
    differing = [(layer, a > r) for layer, a, r in pairs if a != r]
    claim = "Attention-output SAEs leave more dead features than residual-stream SAEs at the same layer (App. F)"
    verdict = sign_test(claim, [ok for _, ok in differing], units=f"layers (of {len(pairs)}; ties left out)",
                        alpha=alpha, labels=[f"L{layer}" for layer, _ in differing])
    return out + [verdict.named("dead_vs_rank.attn_vs_resid")]


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    points = result["points"]
    any_run = next(iter(result["runs"].values()))
    m = any_run["metrics"]
    rep.paragraph(f"Standard-init TopK SAEs with {m['n_features']:,} features and k = {m['k']}, {m['tokens']:,} "
                  f"training tokens each, at {len(points)} sites of layers {result['layout']['layers']}; a feature is "
                  f"dead if it did not fire in the last {m['dead_window_tokens']:,} training tokens.")
    rep.add_figure(rfig.dead_vs_erank, (points,), fig_dir / "fig5_dead_vs_erank.png",
               "A: dead-feature fraction per layer and site kind; B: against the site's effective rank "
               "(cf. Figure 5).")
    rep.table(["site", "effective rank", "dead fraction", "FVU"],
              [[p["site"], p["effective_rank"], p["train_dead_fraction"], p["fvu"]] for p in points],
              number_format={"dead fraction": ".2%"})
    verdict_blocks(rep, found)
