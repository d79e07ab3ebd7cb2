"""Experiment 2: the output projection W_O further reduces the rank of attention outputs (Section 4.4; Figures 4, 11).

Read from experiment 1's spectrum job (one forward pass measured both): the decomposition Var(O e) =
Var(Z v_hat) * ||v||^2 with v = W_O e along the middle layer's principal directions of O, and the effective rank of
Z (`attn_z`) beside O (`attn_out`) at every layer.

Verdicts: the effective rank of O is below that of Z at most layers (sign test over layers, Figure 11), and the
fall of O's spectrum from its head to its tail comes mainly from W_O (its share of the log drop between the first
and last 10% of directions exceeds one half, Figure 4: "its downward trend at the tail is mainly due to W_O").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranklens.report.html import Report
from ranklens.reproduce.experiments import low_rank
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, compare_values, sign_test
from ranklens.spectrum import figures
from ranklens.spectrum.report import decomposition_summary

NAME = "wo"
TITLE = "2. The role of W_O (Figures 4, 11)"


def step(plan: Plan) -> Step:
    def run(ctx) -> dict[str, Any]:
        spectrum = ctx.records[low_rank.NAME]["result"]
        records = [r for r in spectrum["records"] if r["kind"] in ("attn_z", "attn_out")]
        mid = next(r for r in records if r["layer"] == plan.mid and r["kind"] == "attn_out")
        return {"middle_layer": plan.mid, "source": spectrum["spectrum_json"],
                "erank": [{k: r[k] for k in ("site", "layer", "kind", "d", "effective_rank")} for r in records],
                "decomposition": mid["wo_decomposition"],
                "summary": decomposition_summary(mid["wo_decomposition"])}

    return Step(NAME, TITLE, run, {"reads": low_rank.NAME, "layer": plan.mid})


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    by = low_rank.by_layer(result["erank"])
    pairs = [(layer, k["attn_out"]["effective_rank"] < k["attn_z"]["effective_rank"]) for layer, k in by.items()
             if {"attn_out", "attn_z"} <= set(k)]
    out = [sign_test("The attention output O = Z W_O has a lower effective rank than the concatenated head outputs Z "
                     "(Figure 11)", [ok for _, ok in pairs], units="layers", alpha=alpha,
                     labels=[f"L{layer}" for layer, _ in pairs]).named("wo.o_below_z")]
    summary = result["summary"] or {}
    out.append(compare_values(f"At layer {result['middle_layer']}, the tail of the attention output's spectrum falls "
                              "mainly because of W_O (Figure 4): W_O's share of the head-to-tail drop of Var(O e) "
                              "exceeds one half", 0.5, summary.get("wo_share"), name_a="one half",
                              name_b="W_O's share of the drop (log scale)").named("wo.tail_from_wo"))
    return out


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    mid = result["middle_layer"]
    rep.add_figure(figures.wo_decomposition, ({"site": f"L{mid}.attn_out", "layer": mid,
                                                 "wo_decomposition": result["decomposition"]},),
               fig_dir / "fig4_wo_decomposition.png",
               f"L{mid}.attn_out: Var(O e) along O's principal directions (red) = contribution of Z (purple) x "
               "contribution of W_O (blue) (cf. Figure 4).")
    rep.add_figure(figures.erank_z_vs_o, (result["erank"],), fig_dir / "fig11_erank_z_vs_o.png",
               "Effective rank of Z and of O = Z W_O per layer (cf. Figure 11).")
    s = result["summary"]
    if s:
        rep.table(["quantity", "head (first 10%)", "tail (last 10%)", "tail / head"],
                  [[name, s[key]["head"], s[key]["tail"], s[key]["ratio"]]
                   for key, name in (("var_O", "Var(O e)"), ("contrib_Z", "contribution of Z"),
                                     ("contrib_WO", "contribution of W_O"))],
                  caption=f"Geometric means over {s['size']} of {s['n_used']} directions; W_O's share of the log "
                          f"drop: {s['wo_share']:.1%}" if s.get("wo_share") is not None else None)
    verdict_blocks(rep, found)
