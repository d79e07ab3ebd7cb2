"""Lorsa paper App. C, Figure 9: L(N, K) of Lorsa and of a TopK SAE on the same layer, with the joint power law of
Gao et al. fitted to each (``ranklens.analysis.scaling_law``).

N is the number of Lorsa heads or SAE features (multiples of d: --lorsa-scaling-expansions) and K the number active
per token (--lorsa-scaling-k); the loss is the held-out FVU after the same number of training tokens (--lorsa-tokens)
from the run's store at the middle layer: the Lorsa predicts the attention output from the attention input, the SAE
reconstructs the attention output. One seed per point, as Figure 9.

Verdicts: the loss falls as N grows at fixed K (a sign test over every pair of consecutive sizes at every K, for
Lorsa); and Lorsa's loss is above the SAE's at equal N and K (App. C: "reasonable ... because SAE has identical input
and output"; a sign test over the grid).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ranklens.analysis.scaling_law import ScalingFit, fit_scaling_law, scaling_figure
from ranklens.errors import RanklensError
from ranklens.report.html import Report
from ranklens.reproduce.commands import cli_command
from ranklens.reproduce.experiments.lorsa import LORSA_DIR, LorsaCell, lorsa_config, train_cells
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, sign_test

NAME = "lorsa_scaling"
TITLE = "Lorsa App. C: L(N, K) of Lorsa and of a TopK SAE (Figure 9)"


def _grid(plan: Plan) -> tuple[list[tuple[int, int, LorsaCell]], list[tuple[int, int, Any]]]:
    c, d = plan.cfg, plan.shape.d_model
    groups = c.lorsa_qk_groups_per_head * plan.shape.n_heads
    seed = c.seed_list()[0]
    too_big = [k for k in c.lorsa_scaling_k if k > min(c.lorsa_scaling_expansions) * d]
    if too_big:
        raise RanklensError(f"--lorsa-scaling-k {too_big}: more active than the {min(c.lorsa_scaling_expansions) * d} "
                            "heads of the smallest size")
    lorsa = [(e * d, k, LorsaCell("default", e * d, groups, k, c.lorsa_tokens, seed))
             for e in c.lorsa_scaling_expansions for k in c.lorsa_scaling_k]
    sae = [(e * d, k, plan.cell("TopK", expansion=e, k=k, seed=seed, tokens=c.lorsa_tokens))
           for e in c.lorsa_scaling_expansions for k in c.lorsa_scaling_k]
    return lorsa, sae


def step(plan: Plan) -> Step:
    lorsa, sae = _grid(plan)
    points = {"lorsa": [{"n": n, "k": k, "run": x.name} for n, k, x in lorsa],
              "sae": [{"n": n, "k": k, "run": x.name} for n, k, x in sae]}
    commands = ([cli_command("train lorsa", lorsa_config(plan, x), plan.out / LORSA_DIR / x.name) for _, _, x in lorsa]
                + [plan.sae_command(x) for _, _, x in sae])

    def run(ctx) -> dict[str, Any]:
        runs = train_cells(ctx, plan, [x for _, _, x in lorsa])
        metrics = ctx.train_all([x for _, _, x in sae])
        runs.update({x.name: {"cell": asdict(x), "dir": f"sae/{x.name}", "metrics": metrics[x.name]}
                     for _, _, x in sae})
        fits = {}
        for part, pts in points.items():
            loss = [runs[p["run"]]["metrics"]["fvu"] for p in pts]
            try:
                fits[part] = fit_scaling_law([p["n"] for p in pts], [p["k"] for p in pts], loss).to_dict()
            except RanklensError as err:  # too few points for six parameters: the figure shows the points alone
                fits[part] = {"error": str(err)}
        return {"points": points, "runs": runs, "fits": fits}

    config = {"points": points,
              "lorsa_runs": {x.name: lorsa_config(plan, x).model_dump(mode="json") for _, _, x in lorsa},
              "sae_runs": {x.name: plan.sae_config(x).model_dump(mode="json") for _, _, x in sae}}
    return Step(NAME, TITLE, run, config, commands)


def _loss(result: dict[str, Any], part: str) -> dict[tuple[int, int], float]:
    return {(p["n"], p["k"]): float(result["runs"][p["run"]]["metrics"]["fvu"]) for p in result["points"][part]}


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    lorsa, sae = _loss(result, "lorsa"), _loss(result, "sae")
    ns, ks = sorted({n for n, _ in lorsa}), sorted({k for _, k in lorsa})
    falls = [lorsa[(b, k)] < lorsa[(a, k)] for k in ks for a, b in zip(ns, ns[1:], strict=False)]
    labels = [f"K {k}: N {a} -> {b}" for k in ks for a, b in zip(ns, ns[1:], strict=False)]
    above = [lorsa[key] > sae[key] for key in lorsa if key in sae]
    return [sign_test("Lorsa's loss falls as the number of heads grows at fixed K (App. C, Figure 9)", falls,
                      units="pairs of consecutive sizes", alpha=alpha, labels=labels).named("lorsa_c.falls_with_n"),
            sign_test("Lorsa's loss is above the TopK SAE's at equal N and K (App. C)", above, units="grid points",
                      alpha=alpha, labels=[f"N {n}, K {k}" for n, k in lorsa if (n, k) in sae]
                      ).named("lorsa_c.above_sae")]


def _fit(record: dict[str, Any]) -> ScalingFit | None:
    if "params" not in record:
        return None
    return ScalingFit(record["params"], record["stderr"], record["rms_log_error"], record["n_points"])


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    series = {}
    for part, label in (("lorsa", "Lorsa"), ("sae", "TopK SAE")):
        points = [{"n": p["n"], "k": p["k"], "loss": result["runs"][p["run"]]["metrics"]["fvu"]}
                  for p in result["points"][part]]
        series[label] = (points, _fit(result["fits"][part]))
    first = next(iter(result["runs"].values()))["metrics"]
    rep.paragraph(f"Held-out FVU after {first['tokens']:,} training tokens per point, one seed, middle layer. The fit: "
                  "L(N, K) = exp(alpha + beta_k log K + beta_n log N + gamma log K log N) + exp(zeta + eta log K) "
                  "(Gao et al. 2024), least squares on log L; \u00b1 is the standard error of the linearized fit.")
    rep.add_figure(scaling_figure, (series,), fig_dir / "fig9_lorsa_scaling.png",
                   "L(N, K) of Lorsa and of a TopK SAE on the same layer, points and fitted law (cf. Lorsa paper "
                   "Figure 9).")
    rows = []
    for label, (_, fit) in series.items():
        if fit is None:
            rows.append([label, "too few points to fit", "", ""])
            continue
        rows += [[label, name, f"{fit.params[name]:.4g} \u00b1 {fit.stderr[name]:.2g}",
                  f"{fit.rms_log_error:.3g}"] for name in fit.params]
    rep.table(["model", "parameter", "value", "rms log error"], rows, caption="Fitted L(N, K) parameters")
    verdict_blocks(rep, found)
