"""Lorsa paper App. B: the QK dimension at a fixed parameter budget (B.1), the number of QK groups (B.2) and the QK
initialization (B.3; Table 3), all on Lorsa layers replacing the middle layer's attention, FVU over seeds.

- B.1: H = ablation_heads_per_d x d heads at every QK dimension, each with 4d parameters (its w_v and w_o, and a
  2d share of its group's W_Q and W_K, so a group binds d_qk heads: G = H / d_qk), at each context length of
  --qk-contexts. Verdict (the first "hard constraint"): a QK dimension below the MHSA's d_head gives a higher FVU
  than d_head itself, at every context length.
- B.2: the run's Lorsa (lorsa_expansion x d heads, d_qk = d_head) with G the divisor of H nearest to each multiple
  of the MHSA's heads in --qk-group-ratios. Verdict (the second "hard constraint"): fewer QK groups than MHSA heads
  give a higher FVU than as many.
- B.3: the run's Lorsa with random Q/K (the default init of App. O.2), the MHSA's Q/K trainable, and the MHSA's Q/K
  fixed. Verdicts (Table 3's ordering): fixed Q/K give a higher FVU than trainable ones and than random ones.

Every comparison is a one-sided Welch test over seeds (``welch_less``).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

from ranklens.errors import RanklensError
from ranklens.report.html import Report
from ranklens.reproduce import figures as rfig
from ranklens.reproduce.commands import cli_command
from ranklens.reproduce.experiments.lorsa import LORSA_DIR, LorsaCell, lorsa_config, train_cells
from ranklens.reproduce.experiments.sae_runs import fmt_mean_std, mean_std, values
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, welch_less

NAME = "qk_ablations"
TITLE = "Lorsa App. B: QK dimension, QK groups and QK initialization"
INIT_LABELS = {"random": "random Q/K", "trainable": "MHSA Q/K, trainable", "fixed": "MHSA Q/K, fixed"}


def nearest_divisor(n: int, target: float) -> int:
    """The divisor of n closest to target (the smaller one on a tie)."""
    divisors = [g for g in range(1, n + 1) if n % g == 0]
    return min(divisors, key=lambda g: (abs(g - target), g))


def layout(plan: Plan) -> dict[str, Any]:
    """Every cell of the three ablations by name: {"b1": {ctx: {d_qk: [names]}}, "b2": {groups: [names]},
    "b3": {init: [names]}}, plus the settings the verdicts and the report need."""
    c, shape = plan.cfg, plan.shape
    d_head = shape.d_model // shape.n_heads
    h1 = c.ablation_heads_per_d * shape.d_model
    bad = [q for q in c.qk_dims if h1 % q]
    if bad:
        raise RanklensError(f"--qk-dims {bad}: each must divide the {h1} heads of App. B.1 "
                            f"(--ablation-heads-per-d {c.ablation_heads_per_d} x d = {shape.d_model})")
    seeds = c.seed_list()

    def cell(**kw) -> list[LorsaCell]:
        base = dict(init="default", k=c.lorsa_k, tokens=c.lorsa_tokens)
        return [LorsaCell(**{**base, **kw}, seed=s) for s in seeds]

    b1 = {ctx: {q: cell(heads=h1, qk_groups=h1 // q, d_qk=q, context=None if ctx == c.context_length else ctx)
                for q in c.qk_dims} for ctx in c.qk_contexts}
    heads = c.lorsa_expansion * shape.d_model
    groups = sorted({nearest_divisor(heads, float(Fraction(r)) * shape.n_heads) for r in c.qk_group_ratios})
    b2 = {g: cell(heads=heads, qk_groups=g) for g in groups}
    main_groups = c.lorsa_qk_groups_per_head * shape.n_heads
    b3 = {"random": cell(heads=heads, qk_groups=main_groups),
          "trainable": cell(heads=heads, qk_groups=main_groups, init="mhsa-qk"),
          "fixed": cell(heads=heads, qk_groups=main_groups, init="mhsa-qk", qk_trainable=False)}
    return {"d_head": d_head, "n_heads": shape.n_heads, "b1_heads": h1, "b2_heads": heads,
            "b1": {str(ctx): {str(q): cs for q, cs in by_q.items()} for ctx, by_q in b1.items()},
            "b2": {str(g): cs for g, cs in b2.items()}, "b3": b3}


def _cells(lay: dict[str, Any]) -> list[LorsaCell]:
    found = [x for by_q in lay["b1"].values() for cs in by_q.values() for x in cs]
    found += [x for cs in lay["b2"].values() for x in cs] + [x for cs in lay["b3"].values() for x in cs]
    return list(dict.fromkeys(found))


def _names(lay: dict[str, Any]) -> dict[str, Any]:
    """The layout with cell names in place of cells (what the step records)."""
    def names(cs: list[LorsaCell]) -> list[str]:
        return [x.name for x in cs]
    return {**lay, "b1": {ctx: {q: names(cs) for q, cs in by_q.items()} for ctx, by_q in lay["b1"].items()},
            "b2": {g: names(cs) for g, cs in lay["b2"].items()}, "b3": {i: names(cs) for i, cs in lay["b3"].items()}}


def step(plan: Plan) -> Step:
    lay = layout(plan)
    cells = _cells(lay)
    recorded = _names(lay)
    commands = [cli_command("train lorsa", lorsa_config(plan, x), plan.out / LORSA_DIR / x.name) for x in cells]

    def run(ctx) -> dict[str, Any]:
        return {"layout": recorded, "runs": train_cells(ctx, plan, cells)}

    config = {"layout": recorded, "lorsa_runs": {x.name: lorsa_config(plan, x).model_dump(mode="json")
                                                 for x in cells}}
    return Step(NAME, TITLE, run, config, commands)


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    lay = result["layout"]
    d_head, n_heads = lay["d_head"], lay["n_heads"]
    found = []
    for ctx, by_q in lay["b1"].items():
        if str(d_head) not in by_q:
            continue
        for q in sorted(int(q) for q in by_q if int(q) < d_head):
            found.append(welch_less(
                f"At context {ctx}, QK dimension {d_head} (= d_head) gives a lower FVU than {q} at the same "
                "parameter budget (App. B.1: the QK dimension must not be smaller than d_head)",
                values(result, by_q[str(d_head)], "fvu"), values(result, by_q[str(q)], "fvu"),
                name_a=f"d_qk {d_head}", name_b=f"d_qk {q}", alpha=alpha).named(f"lorsa_b1.c{ctx}.q{q}"))
    if str(n_heads) in lay["b2"]:
        for g in sorted(int(g) for g in lay["b2"] if int(g) < n_heads):
            found.append(welch_less(
                f"{n_heads} QK groups (= the MHSA's heads) give a lower FVU than {g} (App. B.2: no fewer QK groups "
                "than MHSA heads)", values(result, lay["b2"][str(n_heads)], "fvu"),
                values(result, lay["b2"][str(g)], "fvu"), name_a=f"G {n_heads}", name_b=f"G {g}",
                alpha=alpha).named(f"lorsa_b2.g{g}"))
    b3 = lay["b3"]
    for other in ("trainable", "random"):
        found.append(welch_less(
            f"Lorsa with {INIT_LABELS[other]} has a lower FVU than with the MHSA's Q/K fixed (App. B.3, Table 3)",
            values(result, b3[other], "fvu"), values(result, b3["fixed"], "fvu"), name_a=other, name_b="fixed",
            alpha=alpha).named(f"lorsa_b3.{other}"))
    return found


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    lay = result["layout"]
    first = next(iter(result["runs"].values()))["metrics"]
    rep.paragraph(f"Middle-layer Lorsa, K = {first['k']}, {first['tokens']:,} training tokens per run, "
                  f"{len(next(iter(lay['b3'].values())))} seeds per setting; the MHSA has {lay['n_heads']} heads of "
                  f"d_head = {lay['d_head']}. B.1: {lay['b1_heads']:,} heads with 4d parameters each; B.2 and B.3: "
                  f"{lay['b2_heads']:,} heads.")
    b1 = {f"context {ctx}": {f"d_qk {q}": mean_std(values(result, names, "fvu")) for q, names in by_q.items()}
          for ctx, by_q in lay["b1"].items()}
    rep.add_figure(rfig.grouped_bars, (b1, "FVU"), fig_dir / "lorsa_b1_qk_dim.png",
                   "App. B.1 (cf. Figure 7): FVU against the QK dimension at a fixed parameter budget (mean \u00b1 "
                   "std over seeds).")
    rows = [[f"B.1, context {ctx}", f"d_qk = {q}, G = {lay['b1_heads'] // int(q)}",
             fmt_mean_std(values(result, names, "fvu"))] for ctx, by_q in lay["b1"].items() for q, names in by_q.items()]
    rows += [["B.2", f"G = {g}", fmt_mean_std(values(result, names, "fvu"))] for g, names in lay["b2"].items()]
    rows += [["B.3", INIT_LABELS[i], fmt_mean_std(values(result, names, "fvu"))] for i, names in lay["b3"].items()]
    rep.table(["ablation", "setting", "FVU"], rows, caption="Mean \u00b1 std over seeds (cf. Figures 7, 8 and Table 3)")
    verdict_blocks(rep, found)
