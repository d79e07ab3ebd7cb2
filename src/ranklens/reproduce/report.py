"""DIR/results.json and DIR/report.html of a reproduce run, built from the step records alone.

Verdicts are computed here, from the recorded numbers, by each experiment's ``verdicts`` function (the statistics of
``ranklens.reproduce.verdicts``); nothing in the report is written by hand. ``results.json`` holds, per step, its
title, exact config, equivalent commands, wall time, result and verdicts; the report shows the same with figures.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from ranklens.data.corpus import splits_documents
from ranklens.io import atomic_write_bytes, atomic_write_json
from ranklens.report.html import Report, software_versions
from ranklens.reproduce.presets import ReproduceConfig
from ranklens.reproduce.results_format import RESULTS_FORMAT
from ranklens.reproduce.verdicts import Verdict

RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"
SUMMARY_NAME = "results.md"
FIGURES_DIR = "figures"


def git_commit() -> str:
    """The commit of the ranklens source tree this run used ("+dirty" with local changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def scale(cfg: ReproduceConfig, plan_info: dict[str, Any]) -> dict[str, Any]:
    """The tokens and sizes a run used, for the report's first table."""
    d = plan_info["d_model"]
    base = ReproduceConfig.load(preset=cfg.preset)
    overrides = [f"{k}={v}" for k, v in cfg.model_dump().items() if v != getattr(base, k)]
    ran = set(cfg.experiments)
    rows: dict[str, Any] = {
        "preset": cfg.preset + (f" with {', '.join(overrides)}" if overrides else ""),
        "experiments": ", ".join(cfg.experiments),
        "model": f"{cfg.model} ({plan_info['n_layers']} layers, d = {d}); middle layer {plan_info['middle_layer']}",
        "corpus": cfg.corpus,
        "documents": (f"split into contexts of {cfg.context_length:,} tokens (every token used)"
                      if splits_documents(cfg.corpus) else
                      f"truncated to {cfg.context_length:,} tokens behind <bos> (App. E.2)"),
    }
    if ran & {"low_rank", "wo"}:
        rows.update({"spectrum tokens per site": cfg.spectrum_tokens,
                     "comparison tokens per setting": cfg.compare_tokens, "loss-recovered tokens": cfg.loss_tokens})
    rows.update({
        "SAE store tokens": cfg.store_tokens,
        "SAE training tokens": f"{cfg.sae_tokens:,} (scaling: {cfg.scaling_tokens:,}), batch {cfg.batch_size:,}",
        "SAE size": f"{cfg.expansion}x d = {cfg.expansion * d:,} features, k = {cfg.k}, d_init = {cfg.d_init}",
        "SAE b_D start (every init)": cfg.b_dec_init,
        "seeds per cell": cfg.seeds,
    })
    if "dead_vs_rank" in ran:
        rows["layers of the dead-feature sweep"] = ", ".join(map(str, plan_info["sweep_layers"]))
    if "asi" in ran:
        rows["d_init sweep"] = ", ".join(map(str, cfg.d_init_values))
        rows["k sweep"] = ", ".join(map(str, sorted(set(cfg.k_values) | {cfg.k})))
    if "scaling" in ran:
        rows["dictionary sizes (scaling)"] = ", ".join(f"{e}x" for e in cfg.scaling_expansions)
    if "budget" in ran:
        rows["curve points (training tokens)"] = ", ".join(f"{t:,}" for t in cfg.curve_tokens) + ", end"
        if cfg.lr_sweep:
            rows["learning-rate sweep"] = (f"{', '.join(f'{lr:g}' for lr in cfg.lr_sweep)} over "
                                           f"{cfg.lr_sweep_tokens:,} tokens")
    rows["held-out tokens (FVU / LM loss)"] = f"{cfg.eval_tokens:,} / {cfg.lm_eval_tokens:,}"
    rows["significance level"] = cfg.alpha
    return rows


def build(out: Path, cfg: ReproduceConfig, plan_info: dict[str, Any], experiments: list, records: dict[str, Any],
          command: str | None) -> dict[str, Any]:
    """Compute the verdicts, write results.json and report.html; returns the results."""
    out = Path(out)
    found: dict[str, list[Verdict]] = {m.NAME: m.verdicts(records[m.NAME]["result"], cfg.alpha)
                                       for m in experiments if m.NAME in records}
    software = {**software_versions(), "git_commit": git_commit()}
    results = {
        "format": RESULTS_FORMAT, "command": command, "config": cfg.model_dump(mode="json"),
        "plan": plan_info, "scale": scale(cfg, plan_info), "software": software,
        "wall_seconds": sum(r["wall_seconds"] for r in records.values()),
        "steps": {name: {**rec, "verdicts": [v.to_json() for v in found.get(name, [])]}
                  for name, rec in records.items()},
    }
    atomic_write_json(out / RESULTS_NAME, results)
    _report(out, results, experiments, records, found).write(out / REPORT_NAME)
    atomic_write_bytes(out / SUMMARY_NAME, summary_markdown(results, experiments).encode())
    return results


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(results: dict[str, Any], experiments: list) -> str:
    """The verdict table of results.json as Markdown (DIR/results.md), for a README or a paper's appendix."""
    cfg, titles = results["config"], {m.NAME: m.TITLE for m in experiments}
    lines = [f"Verdicts of `ranklens reproduce` on {cfg['model']}, preset {cfg['preset']} "
             f"({results['wall_seconds'] / 3600:.1f} h; ranklens {results['software'].get('ranklens', '?')}, "
             f"commit {results['software'].get('git_commit', 'unknown')[:12]}); significance level {cfg['alpha']}.",
             "", f"Command: `{results['command']}`" if results.get("command") else "", "",
             "| experiment | claim | verdict | statistic |", "|---|---|---|---|"]
    for name, step in results["steps"].items():
        for v in step.get("verdicts", []):
            lines.append(f"| {_cell(titles.get(name, name).split(' (')[0])} | {_cell(v['claim'])} | **{v['verdict']}** "
                         f"| {_cell(v['statistic'])} |")
    return "\n".join(line for line in lines) + "\n"


def _report(out: Path, results: dict[str, Any], experiments: list, records: dict[str, Any],
            found: dict[str, list[Verdict]]) -> Report:
    cfg = results["config"]
    rep = Report(f"ranklens reproduce: {cfg['model']}, {cfg['preset']} preset")
    rep.paragraph("The experiments of 'Dimensional Collapse in Transformer Attention Outputs' measured on this model. "
                  "Every verdict below is computed from the numbers of this run by the statistic shown beside it "
                  f"(significance level {cfg['alpha']}); results.json holds every number, and each step's commands "
                  "redo it on their own.")
    rep.key_values(results["scale"], caption="Scale of this run")
    rep.heading("Verdicts")
    titles = {m.NAME: m.TITLE for m in experiments}
    rep.table(["experiment", "claim", "verdict", "statistic"],
              [[titles[name].split(" (")[0], v.claim, v.verdict, v.statistic] for name, vs in found.items() for v in vs])
    counts = {word: sum(v.verdict == word for vs in found.values() for v in vs)
              for word in ("holds", "does not hold", "inconclusive")}
    rep.paragraph(", ".join(f"{n} {word}" for word, n in counts.items()) + ".")
    fig_dir = out / FIGURES_DIR
    for module in experiments:
        if module.NAME not in records:
            continue
        record = records[module.NAME]
        rep.heading(module.TITLE)
        module.section(rep, record, found[module.NAME], fig_dir)
        _step_details(rep, record)
    other = [r for name, r in records.items() if name not in titles]
    if other:
        rep.heading("Shared steps")
        for record in other:
            rep.heading(record["title"], level=3)
            rep.key_values({k: v for k, v in record["result"].items() if not isinstance(v, list | dict)})
            _step_details(rep, record)
    rep.heading("Run details")
    if results["command"]:
        rep.code(results["command"])
    rep.table(["step", "wall time (s)", "attempts"],
              [[r["title"], r["wall_seconds"], r["attempts"]] for r in records.values()]
              + [["total", results["wall_seconds"], None]], caption="Wall time per step", number_format=".1f")
    rep.heading("Resolved config", level=3)
    rep.code(yaml.safe_dump(cfg, sort_keys=False).rstrip())
    rep.key_values(results["software"], caption="Software")
    return rep


def _step_details(rep: Report, record: dict[str, Any]) -> None:
    commands = record.get("commands") or []
    rep.paragraph(f"Step {record['name']}: {record['wall_seconds']:.1f} s wall time"
                  + (f" over {record['attempts']} attempts" if record["attempts"] > 1 else "")
                  + (f"; {len(commands)} equivalent command{'s' if len(commands) != 1 else ''}:" if commands else "."))
    if commands:
        rep.code("\n".join(commands))
