"""Experiment 9: does ASI's advantage appear with budget? Curves over training tokens (Section 5.2, App. H, M).

At the middle layer's attention output, over the preset's seeds and with every SAE's b_D started the same way:
TopK, AuxK, ASI with the run's d_init (``auto`` by default) and with each of ``budget_d_init_values``, and ASI with
SparseAdam. Every run logs its held-out FVU and the features that never fired on the held-out tokens at the
preset's ``curve_tokens`` and at its end (``curve.jsonl``), so the report shows where the lines cross or do not.
The learning rate is the run's ``lr``, or the one the ``lr_sweep`` step chose when the preset sweeps. A long run can
be split over jobs by seed (``--only-seeds``); a last run with ``--reuse DIR ...`` takes the SAE runs those jobs
finished with the same settings (their metrics and curves) and trains only the rest, so its verdicts cover every seed.

Verdicts, at the end of training (dead = not fired in the training window, as in experiment 4) and again at each of
``budget_verdict_tokens`` shorter than the run (dead = never fired on the held-out tokens, the only dead count that
means something before a whole window has passed): each ASI variant has a lower FVU and a lower dead fraction than
TopK and than AuxK (one-sided Welch tests over seeds, App. H); and at the end, SparseAdam leaves fewer dead features
than Adam under ASI (App. M).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ranklens.report.html import Report
from ranklens.reproduce import figures as rfig
from ranklens.reproduce.experiments.sae_runs import fmt_mean_std, mean_std
from ranklens.reproduce.pipeline import Step, finished_elsewhere
from ranklens.reproduce.plan import Cell, Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, welch_less
from ranklens.train.trainer import CURVE_NAME

NAME = "budget"
TITLE = "9. ASI against TopK and AuxK over training tokens (Section 5.2, App. H, M)"
BASELINES = ("TopK", "AuxK")
SPARSEADAM = "ASI + SparseAdam"


def asi_label(d_init: int | str) -> str:
    return f"ASI (d_init {d_init})"


def groups(plan: Plan, lr: float | None) -> dict[str, list[Cell]]:
    """label -> the cells of that method over the seeds."""
    c = plan.cfg
    out = {m: plan.cells(m, lr=lr) for m in BASELINES}
    for d_init in [c.d_init, *(v for v in c.budget_d_init_values if v != c.d_init)]:
        out[asi_label(d_init)] = plan.cells("ASI", d_init=d_init, lr=lr)
    out[SPARSEADAM] = plan.cells(SPARSEADAM, lr=lr)
    return out


def read_curve(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / CURVE_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def step(plan: Plan) -> Step:
    c = plan.cfg
    swept = bool(c.lr_sweep)
    config = {"site": plan.main_site, "methods": list(groups(plan, None)), "seeds": c.seed_list(),
              "tokens": c.sae_tokens, "lr": "chosen by lr_sweep" if swept else c.lr,
              "curve_tokens": c.curve_tokens, "verdict_tokens": c.budget_verdict_tokens,
              "sae": plan.sae_config(plan.cell("TopK")).model_dump(mode="json", exclude={"lr", "seed"})}

    def run(ctx) -> dict[str, Any]:
        lr = ctx.records["lr_sweep"]["result"]["chosen_lr"] if swept else None
        by_label = groups(plan, lr)
        cells = list(dict.fromkeys(cell for cs in by_label.values() for cell in cs))
        reused = reused_runs(c.reuse, config, {cell.name for cell in cells})
        metrics = ctx.train_all([cell for cell in cells if cell.name not in reused])
        runs = {cell.name: reused.get(cell.name) or {"cell": asdict(cell), "dir": f"sae/{cell.name}",
                                                     "metrics": metrics[cell.name],
                                                     "curve": read_curve(plan.sae_dir(cell))} for cell in cells}
        layout = {"site": plan.main_site, "d": plan.shape.d_model, "lr": c.lr if lr is None else lr,
                  "lr_from_sweep": swept, "tokens": c.sae_tokens, "verdict_tokens": c.budget_verdict_tokens,
                  "groups": {label: [cell.name for cell in cs] for label, cs in by_label.items()}}
        return {"layout": layout, "runs": runs, "commands": [plan.sae_command(cell) for cell in cells]}

    return Step(NAME, TITLE, run, config, [])


def reused_runs(dirs: list[str], config: dict[str, Any], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The runs among `wanted` that experiment 9 finished in the --reuse directories with the same settings (any
    seeds); each keeps its metrics and curve, and its ``dir`` points into the directory it came from."""
    runs: dict[str, dict[str, Any]] = {}
    for source, result in finished_elsewhere(dirs, NAME, config, ignore=("seeds",)):
        for name, run in result["runs"].items():
            if name in wanted and name not in runs:
                runs[name] = {**run, "dir": str(source / run["dir"]), "reused": True}
    return runs


# --------------------------------------------------------------------------- numbers


def final(result: dict[str, Any], names: list[str], metric: str) -> list[float]:
    return [float(result["runs"][n]["metrics"][metric]) for n in names
            if result["runs"][n]["metrics"].get(metric) is not None]


def at_tokens(result: dict[str, Any], names: list[str], tokens: int, metric: str) -> list[float]:
    """Each run's curve value of `metric` at the first point with at least `tokens` training tokens."""
    out = []
    for n in names:
        point = next((p for p in result["runs"][n]["curve"] if p["tokens"] >= tokens), None)
        if point is not None and point.get(metric) is not None:
            value = point[metric]
            out.append(value / result["runs"][n]["metrics"]["n_features"] if metric == "eval_dead" else value)
    return out


def curve_series(result: dict[str, Any], names: list[str], metric: str) -> list[tuple[float, float, float]]:
    """(tokens, mean, std) over the runs at each curve point they share."""
    by_tokens: dict[int, list[float]] = {}
    for n in names:
        n_features = result["runs"][n]["metrics"]["n_features"]
        for p in result["runs"][n]["curve"]:
            if p.get(metric) is not None:
                value = p[metric] / n_features if metric == "eval_dead" else p[metric]
                by_tokens.setdefault(int(p["tokens"]), []).append(float(value))
    return [(t, *mean_std(vs)) for t, vs in sorted(by_tokens.items()) if len(vs) == len(names)]


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    lay = result["layout"]
    g = lay["groups"]
    asi_groups = [label for label in g if label.startswith("ASI (")]
    out = []
    checkpoints = [("end", None)] + [(f"{t:,} tokens", t) for t in lay["verdict_tokens"] if t < lay["tokens"]]
    for when, tokens in checkpoints:
        metrics = (("fvu", "FVU"), ("train_dead_fraction", "dead fraction")) if tokens is None else \
            (("fvu", "held-out FVU"), ("eval_dead", "share of features never firing on held-out text"))
        for label in asi_groups:
            for baseline in BASELINES:
                for metric, words in metrics:
                    def get(names, metric=metric, tokens=tokens):
                        return final(result, names, metric) if tokens is None else \
                            at_tokens(result, names, tokens, metric)
                    claim = (f"{label} has a lower {words} than {baseline} "
                             f"{'at the end of training' if tokens is None else 'after ' + when}")
                    at = "end" if tokens is None else tokens
                    out.append(welch_less(claim, get(g[label]), get(g[baseline]), name_a=label, name_b=baseline,
                                          alpha=alpha).named(f"budget.{at}.{metric}.{label}.{baseline}"))
    main = asi_groups[0]
    out.append(welch_less("SparseAdam leaves fewer dead features than Adam under ASI at the end of training (App. M)",
                          final(result, g[SPARSEADAM], "train_dead_fraction"), final(result, g[main], "train_dead_fraction"),
                          name_a=SPARSEADAM, name_b=main, alpha=alpha).named("budget.sparseadam_dead"))
    return out


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    lay = result["layout"]
    g = lay["groups"]
    m = result["runs"][g["TopK"][0]]["metrics"]
    rep.paragraph(f"{lay['site']} (d = {lay['d']}), {m['n_features']:,} features, {lay['tokens']:,} training tokens "
                  f"per SAE, {len(g['TopK'])} seeds per method, learning rate {lay['lr']:g}"
                  f"{' (chosen by the sweep above)' if lay['lr_from_sweep'] else ''}, b_D started at "
                  f"{'the data mean' if m.get('b_dec_init') == 'mean' else 'zero'} for every method. Curves: held-out "
                  f"FVU and the share of features that never fire on the {m.get('eval_tokens', 0):,} held-out tokens, "
                  f"at each logged point (mean and one standard deviation over seeds). At the end, dead = not fired "
                  f"in the last {m['dead_window_tokens']:,} training tokens.")
    reused = sorted({str(Path(r["dir"]).parent.parent) for r in result["runs"].values() if r.get("reused")})
    if reused:
        n = sum(bool(r.get("reused")) for r in result["runs"].values())
        rep.paragraph(f"{n} of the {len(result['runs'])} SAE runs were trained by earlier jobs of this split run "
                      f"(--only-seeds) and taken from {', '.join(reused)} (--reuse); their metrics and curves are "
                      "theirs, their weights stayed there.")
    panels = [rfig.Panel(label, "training tokens", {name: curve_series(result, names, metric)
                                                    for name, names in g.items()}, logx=True)
              for metric, label in (("fvu", "held-out FVU"), ("eval_dead", "never fire on held-out text"))]
    rep.add_figure(rfig.curve_panels, (panels,), fig_dir / "fig_budget_curves.png",
               "A: held-out FVU against training tokens; B: share of features never firing on the held-out tokens "
               "(mean \u00b1 std over seeds, log axis).")
    rows = [[label, fmt_mean_std(final(result, names, "fvu")), fmt_mean_std(final(result, names, "train_dead_fraction")),
             fmt_mean_std(final(result, names, "eval_dead_fraction")),
             fmt_mean_std(final(result, names, "delta_lm_loss"))] for label, names in g.items()]
    rep.table(["method", "FVU", "dead fraction (training window)", "never fire on held-out text", "Delta LM loss"],
              rows, caption="At the end of training, mean \u00b1 std over seeds")
    points = sorted({int(p["tokens"]) for r in result["runs"].values() for p in r["curve"]})
    if points:
        for metric, caption in (("fvu", "Held-out FVU at each curve point (tokens)"),
                                ("eval_dead", "Share of features never firing on the held-out tokens at each curve "
                                              "point (tokens)")):
            rows = [[label] + [fmt_mean_std(at_tokens(result, names, t, metric)) for t in points]
                    for label, names in g.items()]
            rep.table(["method", *(f"{t:,}" for t in points)], rows, caption=caption)
    verdict_blocks(rep, found)
