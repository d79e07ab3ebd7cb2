"""Lorsa paper Section 5 (App. E, F.3): attention heads by function, with `ranklens heads`
(``ranklens.analysis.heads``).

First every MHSA head of every layer is scored on the probes of the Lorsa tasks (induction, previous token,
attention sinks; App. F.3's table is the induction one). The paper trains a Lorsa on every layer; here one Lorsa
(ASI init, the run's Lorsa settings, captured on the fly) goes to the layer of each task's strongest MHSA head (the
largest path-patching effect among heads with the share threshold of their attention on the task's sources, else
among all), or every task's to ``--heads-layer``; tasks that land on one layer share its Lorsa. Then every task's
probe scores the MHSA heads of every layer and every Lorsa's heads: path patching, attribution, pattern share, the
model's accuracy, operand plots and broadcast scores.

Verdicts (existence claims, each a comparison of the best measured head with the fixed thresholds of `ranklens
heads`): the MHSA has an induction head (F.3; SmolLM2 is known to learn them); and for induction, previous token and
attention sinks, some Lorsa head does the task (Section 5.1: Lorsa re-discovers such heads): its path-patching effect
where active reaches the threshold while at least the share threshold of its z pattern falls on the task's sources.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ranklens.analysis.config import HeadsConfig
from ranklens.analysis.heads import best_with_share, find_heads
from ranklens.analysis.heads_report import heads_sections
from ranklens.report.html import Report
from ranklens.reproduce.commands import cli_command
from ranklens.reproduce.experiments.lorsa import LORSA_DIR, LorsaCell, lorsa_config, train_cells
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, compare_values

NAME = "heads"
TITLE = "Lorsa Section 5: heads by function (path patching, attribution, z patterns)"
HEADS_DIR = "heads"
LORSA_TASKS = ("induction", "previous_token", "attention_sink")


def _heads_config(plan: Plan, **kw) -> HeadsConfig:
    c = plan.cfg
    return HeadsConfig(**{"model": c.model, "device": c.device, "prompts": c.heads_prompts, "corpus": c.corpus,
                          "seed": c.seed, "tasks": c.heads_tasks, **kw})


def _cell(plan: Plan, layer: int) -> LorsaCell:
    c, shape = plan.cfg, plan.shape
    return LorsaCell("asi", c.lorsa_expansion * shape.d_model, c.lorsa_qk_groups_per_head * shape.n_heads, c.lorsa_k,
                     c.lorsa_tokens, c.seed_list()[0], layer=layer)


def _scan_tasks(plan: Plan) -> list[str]:
    """The tasks whose strongest MHSA head places a Lorsa (induction always: it also gives the F.3 table)."""
    return ["induction"] + [t for t in LORSA_TASKS[1:] if t in plan.cfg.heads_tasks]


def strongest_layer(task_result: dict[str, Any], share: float) -> int:
    """The layer of the MHSA head with the largest path-patching effect where active (in the task's direction) among
    those with at least `share` of their attention on the task's sources; among all ranked heads when none has."""
    sign = task_result["sign"]
    ranked = [r for r in task_result["mhsa"] if r["active_rows"] > 0]
    best = best_with_share(ranked, sign, share) or max(ranked, key=lambda r: sign * r["path_patching_active"])
    return int(best["layer"])


def step(plan: Plan) -> Step:
    c = plan.cfg
    scan_cfg = _heads_config(plan, tasks=_scan_tasks(plan), layers="*", broadcast_sequences=0, operand_heads=0)
    config = {"scan": scan_cfg.model_dump(mode="json"), "heads_layer": c.heads_layer,
              "lorsa": lorsa_config(plan, _cell(plan, 0)).model_dump(mode="json", exclude={"layer"})}

    def run(ctx) -> dict[str, Any]:
        out = plan.out / HEADS_DIR
        scan = find_heads(scan_cfg, out / "scan", progress=ctx.progress)
        layers = {task: strongest_layer(r, scan["share"]) if c.heads_layer == "auto" else int(c.heads_layer)
                  for task, r in scan["tasks"].items()}
        cells = [_cell(plan, layer) for layer in sorted(set(layers.values()))]
        runs = train_cells(ctx, plan, cells)
        full_cfg = _heads_config(plan, lorsa=[str(plan.out / LORSA_DIR / x.name) for x in cells])
        full = find_heads(full_cfg, out, progress=ctx.progress)
        commands = [cli_command("heads", scan_cfg, out / "scan")]
        commands += [cli_command("train lorsa", lorsa_config(plan, x), plan.out / LORSA_DIR / x.name) for x in cells]
        commands.append(cli_command("heads", full_cfg, out))
        return {"layers": layers, "layer_from": "each task's strongest MHSA head" if c.heads_layer == "auto"
                else "--heads-layer", "scan_top": {task: r["mhsa_top"] for task, r in scan["tasks"].items()},
                "lorsa_runs": [{"layer": x.layer, "tasks": [t for t, layer in layers.items() if layer == x.layer],
                                "cell": asdict(x), "dir": f"{LORSA_DIR}/{x.name}", "metrics": runs[x.name]["metrics"]}
                               for x in cells],
                "heads": full, "commands": commands}

    return Step(NAME, TITLE, run, config)


def _existence(claim: str, claim_id: str, best: dict[str, Any] | None, sign: int, threshold: float, share: float,
               what: str) -> Verdict:
    """Holds when the best head whose pattern share reaches `share` has an effect (in the task's direction) of at
    least `threshold`; does not hold when none reaches the share or its effect stays below."""
    if best is None:
        return Verdict(claim, "does not hold", f"no {what} acting on at least 10 probe rows has {share:.0%} of its "
                       "pattern on the task's sources", {"test": "existence", "best": None}, claim_id)
    effect = sign * best.get("path_patching_active", best["path_patching"])
    name = f"L{best['layer']}.{'H' if what.startswith('MHSA') else ''}{best['head']}"
    return compare_values(claim, threshold, effect, name_a="threshold", name_b=f"{name} (share "
                          f"{best['pattern_share']:.2f})", rel_tol=0).named(claim_id)


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    h = result["heads"]
    threshold, share = h["threshold"], h["share"]
    found = []
    induction = h["tasks"].get("induction")
    if induction is not None:
        found.append(_existence(
            f"An MHSA head does induction: path-patching effect of at least {threshold} logits with at least "
            f"{share:.0%} of its attention on the induction source (App. F.3)", "heads.mhsa.induction",
            best_with_share(induction["mhsa"], 1, share), 1,
            threshold, share, "MHSA head"))
    for task in LORSA_TASKS:
        if task in h["tasks"]:
            sign = h["tasks"][task]["sign"]
            best = best_with_share([lo["best_with_share"] for lo in h["tasks"][task]["lorsa"] if lo["best_with_share"]],
                                   sign, share)
            found.append(_existence(
                f"A Lorsa head does {task.replace('_', ' ')}: effect where active of at least {threshold} with "
                f"at least {share:.0%} of its z pattern on the task's sources (Section 5.1)",
                f"heads.lorsa.{task}", best, sign, threshold, share, "Lorsa head"))
    return found


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    for run in result["lorsa_runs"]:
        m = run["metrics"]
        rep.paragraph(f"Lorsa at layer {run['layer']} (for {', '.join(t.replace('_', ' ') for t in run['tasks'])}: "
                      f"{result['layer_from']}): {m['n_heads']:,} heads, K = {m['k']}, {m['tokens']:,} training "
                      f"tokens, held-out FVU {m['fvu']:.3f}.")
    heads_sections(rep, result["heads"], fig_dir.parent / HEADS_DIR, fig_dir)  # figures/ sits beside heads/
    verdict_blocks(rep, found)
