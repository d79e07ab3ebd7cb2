"""The HTML view of `ranklens heads` results (heads.json): per task the model's accuracy and the top heads, App.
F.3's table of every MHSA head's induction effect, each Lorsa's top heads with their z patterns, operand plots,
broadcast heads and App. G features. `ranklens heads` writes it as heads.html; `reproduce --paper lorsa` puts the same
sections in its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranklens.report.html import Report
from ranklens.report.plots import heatmap

__all__ = ["heads_sections", "write_heads_report"]

REPORT_NAME = "heads.html"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pattern_figure(rep: Report, record: dict[str, Any], path: Path, caption: str) -> None:
    tokens = [t.replace("\n", "\\n") for t in record["tokens"]]
    rep.add_figure(heatmap, (record["pattern"], [f"{i} {t}" for i, t in enumerate(tokens)], tokens), path, caption)


def _induction_table(rep: Report, task: dict[str, Any]) -> None:
    """App. F.3, Table 6: every MHSA head's path-patching effect on the induction probe, a row per layer."""
    layers = sorted({h["layer"] for h in task["mhsa"]})
    n_heads = max(h["head"] for h in task["mhsa"]) + 1
    effect = {(h["layer"], h["head"]): h["path_patching"] for h in task["mhsa"]}
    rep.table(["layer", *[str(h) for h in range(n_heads)]],
              [[str(layer), *[effect.get((layer, h)) for h in range(n_heads)]] for layer in layers],
              caption="Path-patching effect of each MHSA head on the induction probe (logits; cf. App. F.3, Table 6)",
              number_format="+.2f")


def heads_sections(rep: Report, result: dict[str, Any], results_dir: Path, fig_dir: Path) -> None:
    """The tables and figures of the heads.json in `results_dir`, into `rep` (figures written under `fig_dir`)."""
    rep.paragraph(f"{result['prompts']} generated sequences per task, seed {result['seed']}. Path patching ablates one "
                  "head (MHSA: its mean output over the probe; Lorsa: zero) and lets the change reach the logits only "
                  "through residual connections and MLPs; a head does a task when it acts on at least 10 rows, its "
                  f"effect where active (in the task's direction) is at least {result['threshold']} and at least "
                  f"{result['share']:.0%} of its attention or z pattern falls on the task's source tokens.")
    rows = []
    for name, task in result["tasks"].items():
        top = ", ".join(f"L{h['layer']}.H{h['head']} {h['path_patching']:+.2f} ({_share(h['pattern_share'])})"
                        for h in task["mhsa_top"][:3])
        rows.append([name, task["description"], task["metric"], f"{task['accuracy']:.2f}", top,
                     ", ".join(task["mhsa_function_heads"][:6]) or "none"])
    rep.table(["task", "probe", "metric", "model accuracy", "top MHSA heads: effect (share)", "MHSA heads doing it"],
              rows, caption="The model on each probe (top-1 accuracy of the target) and its strongest heads")
    if "induction" in result["tasks"] and result["tasks"]["induction"]["mhsa"]:
        _induction_table(rep, result["tasks"]["induction"])
    for name, task in result["tasks"].items():
        for lo in task["lorsa"]:
            rep.heading(f"{name}: Lorsa L{lo['layer']} ({lo['heads_active']:,} of {lo['n_heads']:,} heads active)",
                        level=3)
            rep.table(["head", "effect where active", "active rows", "share", "attribution", "does it"],
                      [[h["head"], h["path_patching_active"], h["active_rows"], h["pattern_share"],
                        h["attribution"], "yes" if h["function"] else ""] for h in lo["top"]],
                      number_format=".3g")
            features = [h for h in lo["top"] if "features" in h]
            if features:
                rep.table(["head", *[f"top {part} features" for part in ("q", "k", "v", "o")]],
                          [[h["head"], *[", ".join(str(f["feature"]) for f in h["features"].get(part, []))
                                         for part in ("q", "k", "v", "o")]] for h in features],
                          caption="App. G: input-SAE features moving Q and K most (largest KL), input and output "
                                  "features most aligned with w_v and w_o")
            for record in lo["z_patterns"][:1]:
                _pattern_figure(rep, record, fig_dir / f"zpattern_{name}_L{lo['layer']}.png",
                                f"{name}: the z pattern of Lorsa head {record['head']}, the task's top head, on the "
                                f"sequence of its strongest activation (row i: the contribution A_ij v_j of each "
                                f"source j to z_i; scored at position {record['row_position']}).")
            if "operands" in lo:
                rep.figure(Path(results_dir) / lo["operands"]["figure"],
                           "Operand plots (Section 5.2): activation of each top arithmetic head over op1, op2 in "
                           "0..99; " + "; ".join(f"{s['head']}: {s['description']}" for s in lo["operands"]["heads"]))
    for lo in result.get("broadcast", []):
        rep.heading(f"Broadcast heads of Lorsa L{lo['layer']} (thematic anchors, Section 5.3)", level=3)
        rep.table(["head", "broadcast", "sequences"], [[h["head"], h["broadcast"], h["sequences"]] for h in lo["top"]],
                  caption=f"Share of a head's z-pattern mass sent by one token at least {lo['gap']} positions back, "
                          f"over {lo['sequences']} corpus windows of {lo['length']} tokens", number_format=".3g")
        for record in lo["z_patterns"][:1]:
            _pattern_figure(rep, record, fig_dir / f"zpattern_broadcast_L{lo['layer']}.png",
                            f"The z pattern of the top broadcast head {record['head']} on its best window.")


def write_heads_report(result: dict[str, Any], out: Path) -> Path:
    """heads.html in `out` (figures in out/figures)."""
    rep = Report(f"ranklens heads: {result['model']}")
    heads_sections(rep, result, Path(out), Path(out) / "figures")
    return rep.write(Path(out) / REPORT_NAME)
