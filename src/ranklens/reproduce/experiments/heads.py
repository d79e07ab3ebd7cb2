"""Lorsa paper Section 5 (App. E, F.3): attention heads by function, with `ranklens heads`
(``ranklens.analysis.heads``).

First every MHSA head of every layer is scored on the induction probe (App. F.3's table); the Lorsa layer goes where
the strongest induction head is (``--heads-layer auto``) or where asked. A Lorsa (ASI init, the run's Lorsa settings,
captured on the fly) is trained there, and every task's probe scores the MHSA heads of every layer and the Lorsa's
heads: path patching, attribution, pattern share, the model's accuracy, operand plots and broadcast scores.

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
from ranklens.analysis.heads import find_heads
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


def step(plan: Plan) -> Step:
    c = plan.cfg
    scan_cfg = _heads_config(plan, tasks=["induction"], layers="*", broadcast_sequences=0, operand_heads=0)
    config = {"scan": scan_cfg.model_dump(mode="json"), "heads_layer": c.heads_layer,
              "lorsa": lorsa_config(plan, _cell(plan, 0)).model_dump(mode="json", exclude={"layer"})}

    def run(ctx) -> dict[str, Any]:
        out = plan.out / HEADS_DIR
        scan = find_heads(scan_cfg, out / "scan", progress=ctx.progress)
        best = scan["tasks"]["induction"]["mhsa_top"][0]
        layer = best["layer"] if c.heads_layer == "auto" else int(c.heads_layer)
        cell = _cell(plan, layer)
        runs = train_cells(ctx, plan, [cell])
        full_cfg = _heads_config(plan, lorsa=[str(plan.out / LORSA_DIR / cell.name)])
        full = find_heads(full_cfg, out, progress=ctx.progress)
        commands = [cli_command("heads", scan_cfg, out / "scan"),
                    cli_command("train lorsa", lorsa_config(plan, cell), plan.out / LORSA_DIR / cell.name),
                    cli_command("heads", full_cfg, out)]
        return {"layer": layer, "layer_from": "the strongest MHSA induction head" if c.heads_layer == "auto"
                else "--heads-layer", "scan_top": scan["tasks"]["induction"]["mhsa_top"],
                "lorsa_run": {"cell": asdict(cell), "dir": f"{LORSA_DIR}/{cell.name}",
                              "metrics": runs[cell.name]["metrics"]},
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
        qualified = [r for r in induction["mhsa"] if r["pattern_share"] >= share]
        best = max(qualified, key=lambda r: r["path_patching"], default=None)
        found.append(_existence(
            f"An MHSA head does induction: path-patching effect of at least {threshold} logits with at least "
            f"{share:.0%} of its attention on the induction source (App. F.3)", "heads.mhsa.induction", best, 1,
            threshold, share, "MHSA head"))
    for task in LORSA_TASKS:
        if task in h["tasks"]:
            for lo in h["tasks"][task]["lorsa"]:
                found.append(_existence(
                    f"A Lorsa head does {task.replace('_', ' ')}: effect where active of at least {threshold} with "
                    f"at least {share:.0%} of its z pattern on the task's sources (Section 5.1)",
                    f"heads.lorsa.{task}", lo["best_with_share"], h["tasks"][task]["sign"], threshold, share,
                    "Lorsa head"))
    return found


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    h = result["heads"]
    m = result["lorsa_run"]["metrics"]
    rep.paragraph(f"Lorsa at layer {result['layer']} ({result['layer_from']}): {m['n_heads']:,} heads, K = {m['k']}, "
                  f"{m['tokens']:,} training tokens, held-out FVU {m['fvu']:.3f}.")
    heads_sections(rep, h, fig_dir.parent / HEADS_DIR, fig_dir)  # the run's figures/ sits beside its heads/
    verdict_blocks(rep, found)
