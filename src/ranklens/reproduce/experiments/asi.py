"""Experiment 4: Active Subspace Initialization against TopK and AuxK (Section 5.2; Figures 6, 7; Tables 4, 5;
App. H).

At the middle layer's attention output, every cell repeated over the preset's seeds:

- the d_init sweep (Figure 6): ASI with each d_init of the preset below d, against the standard init (d_init = d is
  the standard init, footnote 7);
- the k sweep (Figure 7, Table 4): TopK, AuxK and ASI (the preset's d_init) at each k.

Verdicts: some d_init lowers each metric below the standard init (Welch tests, Bonferroni over the sweep); at the
preset's k, ASI lowers dead features, FVU and Delta LM loss against TopK and against AuxK (the six one-sided Welch
tests of App. H, Table 5); and ASI has the lowest mean FVU of the three methods at every k (sign test over k).
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
from ranklens.reproduce.verdicts import Verdict, bonferroni_any, sign_test, welch_less

NAME = "asi"
TITLE = "4. ASI against TopK and AuxK (Figures 6, 7; Tables 4, 5; App. H)"
K_METHODS = ("TopK", "AuxK", "ASI")


def step(plan: Plan) -> Step:
    c = plan.cfg
    d_inits = [v for v in c.d_init_values if 1 <= v < plan.shape.d_model]
    sweep = {str(v): plan.cells("ASI", d_init=v) for v in d_inits}
    baseline = plan.cells("TopK")
    k_values = sorted(set(c.k_values) | {c.k})
    k_cells = {str(k): {m: plan.cells(m, k=k) for m in K_METHODS} for k in k_values}
    layout = {"site": plan.main_site, "d": plan.shape.d_model, "k_main": c.k, "d_init_main": c.d_init,
              "d_init_sweep": {v: names(cs) for v, cs in sweep.items()}, "baseline": names(baseline),
              "k_sweep": {k: {m: names(cs) for m, cs in ms.items()} for k, ms in k_cells.items()}}
    cells = [cell for cs in sweep.values() for cell in cs] + baseline
    cells += [cell for ms in k_cells.values() for cs in ms.values() for cell in cs]
    return sae_step(NAME, TITLE, plan, cells, layout)


def _metrics(result: dict[str, Any]) -> dict[str, str]:
    return {m: label for m, label in METRICS.items() if has_metric(result, m)}


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    lay = result["layout"]
    out = []
    base = lay["baseline"]
    for metric, label in _metrics(result).items():
        groups = {f"d_init={v}": values(result, ns, metric) for v, ns in lay["d_init_sweep"].items()}
        out.append(bonferroni_any(f"Some d_init below d lowers the {label} below the standard init (Figure 6)",
                                  groups, values(result, base, metric), name_b="standard init", alpha=alpha)
                   .named(f"asi.d_init_sweep.{metric}"))
    main = lay["k_sweep"][str(lay["k_main"])]
    for baseline in ("TopK", "AuxK"):
        for metric, label in _metrics(result).items():
            out.append(welch_less(f"At k = {lay['k_main']}, ASI has a lower {label} than {baseline} (App. H, "
                                  "Table 5)", values(result, main["ASI"], metric),
                                  values(result, main[baseline], metric), name_a="ASI", name_b=baseline,
                                  alpha=alpha).named(f"asi.k_main.{metric}.{baseline}"))
    ks = sorted(lay["k_sweep"], key=int)
    best = [mean_std(values(result, lay["k_sweep"][k]["ASI"], "fvu"))[0]
            < min(mean_std(values(result, lay["k_sweep"][k][m], "fvu"))[0] for m in ("TopK", "AuxK")) for k in ks]
    out.append(sign_test("ASI reaches the lowest mean FVU of TopK, AuxK and ASI at each k (Figure 7)", best,
                         units="values of k", alpha=alpha, labels=[f"k={k}" for k in ks])
               .named("asi.lowest_fvu_each_k"))
    return out


def _series(result: dict[str, Any], groups: dict[str, list[str]], metric: str) -> list[tuple[float, float, float]]:
    return [(float(x), *mean_std(values(result, ns, metric))) for x, ns in groups.items()]


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    lay = result["layout"]
    m = result["runs"][lay["baseline"][0]]["metrics"]
    seeds = len(lay["baseline"])
    rep.paragraph(f"{lay['site']} (d = {lay['d']}), {m['n_features']:,} features, {m['tokens']:,} training tokens, "
                  f"{seeds} seeds per cell; dead = not fired in the last {m['dead_window_tokens']:,} training "
                  f"tokens; FVU and Delta LM loss on held-out text ({m.get('eval_tokens', 0):,} and "
                  f"{m.get('lm_eval_tokens', 0):,} tokens). The main ASI cells use d_init = {lay['d_init_main']}.")
    metrics = _metrics(result)
    base = {metric: mean_std(values(result, lay["baseline"], metric)) for metric in metrics}
    panels = [rfig.Panel(label, "d_init", {"ASI": _series(result, lay["d_init_sweep"], metric)},
                         {"TopK": base[metric]}, logx=True) for metric, label in metrics.items()]
    rep.add_figure(rfig.metric_panels, (panels,), fig_dir / "fig6_d_init_sweep.png",
               f"ASI across d_init: {rfig.panel_letters(metrics.values())} (mean \u00b1 std over seeds); dashed: the "
               "standard init (d_init = d) (cf. Figure 6).")
    k_panels = [rfig.Panel(label, "k", {method: _series(result, {k: ms[method] for k, ms in lay["k_sweep"].items()},
                                                        metric) for method in K_METHODS})
                for metric, label in metrics.items()]
    rep.add_figure(rfig.metric_panels, (k_panels,), fig_dir / "fig7_k_sweep.png",
               f"TopK, AuxK and ASI across k: {rfig.panel_letters(metrics.values())} (mean \u00b1 std over seeds) "
               "(cf. Figure 7, Table 4).")
    rows = [[f"k={k}", label] + [fmt_mean_std(values(result, ms[method], metric)) for method in K_METHODS]
            for k, ms in sorted(lay["k_sweep"].items(), key=lambda kv: int(kv[0])) for metric, label in metrics.items()]
    rows += [[f"k={lay['k_main']}", "dead features (count)"] + [fmt_mean_std(values(
        result, lay["k_sweep"][str(lay["k_main"])][method], "train_dead")) for method in K_METHODS]]
    rep.table(["k", "metric", *K_METHODS], rows, caption=f"Mean \u00b1 std over {seeds} seeds (cf. Table 4)")
    rows = [[f"d_init={v}"] + [fmt_mean_std(values(result, ns, metric)) for metric in metrics]
            for v, ns in lay["d_init_sweep"].items()]
    rows.append([f"standard (d_init = d = {lay['d']})"] + [fmt_mean_std(values(result, lay["baseline"], metric))
                                                           for metric in metrics])
    rep.table(["cell", *metrics.values()], rows, caption="The d_init sweep (cf. Figure 6)")
    verdict_blocks(rep, found)
