"""DIR/results.json and DIR/report.html of a reproduce run, built from the step records alone.

Verdicts are computed here, from the recorded numbers, by each experiment's ``verdicts`` function (the statistics of
``ranklens.reproduce.verdicts``); nothing in the report is written by hand. ``results.json`` holds, per step, its
title, exact config, equivalent commands, wall time, result and verdicts; the report shows the same with figures.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from ranklens.data.corpus import splits_documents
from ranklens.io import atomic_write_bytes, atomic_write_json
from ranklens.report.html import Report, software_versions
from ranklens.reproduce import figures as rfig
from ranklens.reproduce.presets import ReproduceConfig
from ranklens.reproduce.results_format import RESULTS_FORMAT, read_results
from ranklens.reproduce.verdicts import Verdict

# The standard run packaged with the source (the README's results): the runs of the same model and corpus are
# compared with it verdict by verdict (by claim id). Absent in an installed wheel: then no comparison is made.
REFERENCE = Path(__file__).resolve().parents[3] / "docs" / "results" / "standard-smollm2-135m" / "results.json"
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


def held_out_counts(records: Any) -> set[int]:
    """Every held-out token count the runs' evaluations used (``eval_tokens`` beside an ``fvu``), anywhere in the
    step records: fewer than the config asks when the held-out text runs out."""
    if isinstance(records, dict):
        found = {int(records["eval_tokens"])} if "fvu" in records and "eval_tokens" in records else set()
        return found.union(*(held_out_counts(v) for v in records.values()))
    if isinstance(records, list):
        return set().union(*(held_out_counts(v) for v in records))
    return set()


def scale(cfg: ReproduceConfig, plan_info: dict[str, Any], used: set[int] | None = None) -> dict[str, Any]:
    """The tokens and sizes a run used, for the report's first table; `used`: the held-out token counts the
    evaluations used (``held_out_counts``), stated where they fall short of the config."""
    d = plan_info["d_model"]
    base = ReproduceConfig.load(preset=cfg.preset, paper=cfg.paper)
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
    rows["activation store tokens"] = cfg.store_tokens
    if cfg.paper == "collapse":
        rows.update({
            "SAE training tokens": f"{cfg.sae_tokens:,} (scaling: {cfg.scaling_tokens:,}), batch {cfg.batch_size:,}",
            "SAE size": f"{cfg.expansion}x d = {cfg.expansion * d:,} features, k = {cfg.k}, d_init = {cfg.d_init}",
            "SAE b_D start (every init)": cfg.b_dec_init,
        })
    rows["seeds per cell"] = cfg.seeds
    if ran & {"lorsa", "qk_ablations", "lorsa_scaling", "heads"}:
        rows["Lorsa"] = (f"{cfg.lorsa_expansion}x d heads, {cfg.lorsa_qk_groups_per_head} QK group(s) per MHSA head, "
                         f"K = {cfg.lorsa_k}, {cfg.lorsa_tokens:,} tokens in batches of {cfg.lorsa_batch_tokens:,}, "
                         f"lr {cfg.lorsa_lr:g}, b_O start {cfg.lorsa_output_bias}")
    if "qk_ablations" in ran:
        rows["App. B settings"] = (f"QK dimensions {', '.join(map(str, cfg.qk_dims))} with {cfg.ablation_heads_per_d}x "
                                   f"d heads at contexts {', '.join(map(str, cfg.qk_contexts))}; QK groups "
                                   f"{', '.join(cfg.qk_group_ratios)} x the MHSA's heads")
    if "lorsa_scaling" in ran:
        rows["App. C grid"] = (f"N = {', '.join(f'{e}x' for e in cfg.lorsa_scaling_expansions)} d, K = "
                               f"{', '.join(map(str, cfg.lorsa_scaling_k))}; TopK SAEs in batches of {cfg.batch_size:,}")
    if "heads" in ran:
        rows["Section 5 probes"] = f"{cfg.heads_prompts} generated sequences per task; Lorsa layers: " + (
            "each task's strongest MHSA head" if cfg.heads_layer == "auto" else str(cfg.heads_layer))
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
    short = sorted(n for n in used or () if n < cfg.eval_tokens)
    if short:
        rows["held-out tokens (FVU / LM loss)"] += (f"; the held-out text gave only {', '.join(f'{n:,}' for n in short)}"
                                                    " to some evaluations (the corpus ran out)")
    rows["significance level"] = cfg.alpha
    return rows


def training_steps(cfg: ReproduceConfig) -> dict[str, int]:
    """The optimizer steps of each kind of run of this config (whole batches, as ``train sae`` counts them; a
    Lorsa batch holds whole sequences of at least ``lorsa_batch_tokens`` tokens, so it may take fewer)."""
    return {"sae": cfg.sae_tokens // cfg.batch_size, "scaling": cfg.scaling_tokens // cfg.batch_size,
            "lorsa": cfg.lorsa_tokens // cfg.lorsa_batch_tokens}


PAPER_TITLES = {"collapse": "Dimensional Collapse in Transformer Attention Outputs",
                "lorsa": "Towards Understanding the Nature of Attention with Low-Rank Sparse Decomposition"}


def short_run_caveat(cfg: ReproduceConfig) -> str | None:
    """The notice at the top of a quick run's report: how few steps its dictionaries train for (None for the
    other presets)."""
    if cfg.preset != "quick":
        return None
    n = training_steps(cfg)
    standard = ReproduceConfig.load(preset="standard")
    return (f"This is the quick preset: each SAE trains for only {n['sae']:,} steps ({cfg.sae_tokens:,} tokens in "
            f"batches of {cfg.batch_size:,}; the SAEs of the scaling experiment {n['scaling']:,} steps) and each "
            f"Lorsa for about {n['lorsa']:,} steps ({cfg.lorsa_tokens:,} tokens), far from converged (the standard "
            f"preset: {training_steps(standard)['sae']:,} steps of {standard.batch_size:,}). Its verdicts show that "
            "the pipeline runs and how the measurements look early in training; they are not the paper's results.")


def reference_verdicts(reference: dict[str, Any], experiments: list) -> dict[str, dict[str, Any]]:
    """Claim id -> {step, claim, verdict} of a results.json (read by ``read_results``). Verdicts recorded before
    claims had ids get them by recomputing that step's verdicts from its recorded numbers with this version's
    statistics, position by position (the recorded verdict is kept; claims this version adds are left out)."""
    modules = {m.NAME: m for m in experiments}
    alpha = reference.get("config", {}).get("alpha", 0.05)
    out: dict[str, dict[str, Any]] = {}
    for name, step in reference.get("steps", {}).items():
        recorded = step.get("verdicts") or []
        if recorded and not all(v.get("id") for v in recorded):
            if name not in modules:
                continue
            try:
                ids = [v.id for v in modules[name].verdicts(step["result"], alpha)]
            except (KeyError, TypeError, ValueError, IndexError):
                continue  # a record this version cannot read: its verdicts are not compared
            recorded = [{**v, "id": i} for v, i in zip(recorded, ids, strict=False)]
        for v in recorded:
            out[v["id"]] = {"step": name, "claim": v["claim"], "verdict": v["verdict"]}
    return out


def compare_with_reference(cfg: ReproduceConfig, found: dict[str, list[Verdict]], experiments: list,
                           reference_path: Path | None) -> dict[str, Any] | None:
    """The verdicts of this run that differ from the reference run's, by claim id; None when there is no
    reference, or it measured another model, corpus or context length (then verdicts are not comparable)."""
    if reference_path is None or not Path(reference_path).is_file():
        return None
    reference = read_results(reference_path)
    ref_cfg = reference.get("config", {})
    if any(ref_cfg.get(key) != getattr(cfg, key) for key in ("model", "corpus", "context_length")):
        return None
    if ref_cfg.get("paper", "collapse") != cfg.paper:
        return None
    ref = reference_verdicts(reference, experiments)
    shared = [(name, v) for name, vs in found.items() for v in vs if v.id and v.id in ref]
    differing = [{"id": v.id, "step": name, "claim": v.claim, "verdict": v.verdict, "reference": ref[v.id]["verdict"]}
                 for name, v in shared if v.verdict != ref[v.id]["verdict"]]
    try:
        shown = str(Path(reference_path).resolve().relative_to(REFERENCE.parents[2]))
    except ValueError:
        shown = str(reference_path)
    return {"path": shown, "preset": ref_cfg.get("preset"), "model": ref_cfg.get("model"),
            "commit": reference.get("software", {}).get("git_commit"), "compared": len(shared),
            "differing": differing}


def build(out: Path, cfg: ReproduceConfig, plan_info: dict[str, Any], experiments: list, records: dict[str, Any],
          command: str | None, reference: Path | None = None) -> dict[str, Any]:
    """Compute the verdicts, write results.json and report.html; returns the results. ``reference``: a
    results.json to compare the verdicts with (default ``REFERENCE``)."""
    out = Path(out)
    found: dict[str, list[Verdict]] = {m.NAME: m.verdicts(records[m.NAME]["result"], cfg.alpha)
                                       for m in experiments if m.NAME in records}
    comparison = compare_with_reference(cfg, found, experiments, REFERENCE if reference is None else reference)
    software = {**software_versions(), "git_commit": git_commit()}
    results = {
        "format": RESULTS_FORMAT, "command": command, "config": cfg.model_dump(mode="json"),
        "plan": plan_info, "scale": scale(cfg, plan_info, held_out_counts(records)), "software": software,
        "wall_seconds": sum(r["wall_seconds"] for r in records.values()),
        "steps": {name: {**rec, "verdicts": [v.to_json() for v in found.get(name, [])]}
                  for name, rec in records.items()},
    }
    if comparison is not None:
        results["reference"] = comparison
    atomic_write_json(out / RESULTS_NAME, results)
    _report(out, results, experiments, records, found, short_run_caveat(cfg)).write(out / REPORT_NAME)
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


def _reference_notice(rep: Report, comparison: dict[str, Any], titles: dict[str, str]) -> None:
    where = (f"the {comparison['preset']} run of {comparison['model']} packaged in {comparison['path']}"
             + (f" (commit {str(comparison['commit'])[:12]})" if comparison.get("commit") else ""))
    n, diff = comparison["compared"], comparison["differing"]
    if not n:
        return
    if not diff:
        rep.caveat(f"All {n} verdicts this run shares with {where} agree with it.")
        return
    rep.caveat(f"{len(diff)} of the {n} verdicts this run shares with {where} differ from it:")
    rep.verdict_table(["experiment", "claim", "this run", f"{comparison['preset']} run"],
                      [[titles.get(d["step"], d["step"]).split(" (")[0], d["claim"], d["verdict"], d["reference"]]
                       for d in diff], verdict_columns=[2, 3])


def _report(out: Path, results: dict[str, Any], experiments: list, records: dict[str, Any],
            found: dict[str, list[Verdict]], caveat: str | None = None) -> Report:
    cfg = results["config"]
    titles = {m.NAME: m.TITLE for m in experiments}
    rep = Report(f"ranklens reproduce: {cfg['model']}, {cfg['preset']} preset")
    if caveat:
        rep.caveat(caveat)
    if results.get("reference"):
        _reference_notice(rep, results["reference"], titles)
    paper = PAPER_TITLES[cfg.get("paper", "collapse")]
    rep.paragraph(f"The experiments of '{paper}' measured on this model. "
                  "Every verdict below is computed from the numbers of this run by the statistic shown beside it "
                  f"(significance level {cfg['alpha']}); results.json holds every number, and each step's commands "
                  "redo it on their own.")
    rep.key_values(results["scale"], caption="Scale of this run")
    rep.heading("Verdicts")
    rep.verdict_table(["experiment", "claim", "verdict", "statistic"],
                      [[titles[name].split(" (")[0], v.claim, v.verdict, v.statistic]
                       for name, vs in found.items() for v in vs], verdict_columns=[2])
    fig_dir = out / FIGURES_DIR
    for module in experiments:
        if module.NAME not in records:
            continue
        record = records[module.NAME]
        rep.heading(module.TITLE)
        module.section(rep, record, found[module.NAME], fig_dir)
        training_curves(rep, out, record, fig_dir)
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


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _runs(record: dict[str, Any]) -> dict[str, Any]:
    result = record.get("result")
    runs = result.get("runs") if isinstance(result, dict) else None
    return runs if isinstance(runs, dict) else {}


def cells_of(record: dict[str, Any]) -> dict[str, list[str]]:
    """The SAE runs of a step grouped by cell (a run's name without its seed, ``-s<seed>``), in run order."""
    cells: dict[str, list[str]] = {}
    for name, run in _runs(record).items():
        if isinstance(run, dict) and str(run.get("dir", "")).startswith("sae/"):
            cells.setdefault(re.sub(r"-s\d+$", "", name), []).append(name)
    return cells


def training_curves(rep: Report, out: Path, record: dict[str, Any], fig_dir: Path) -> list[Path]:
    """One figure per SAE cell of a step (its seeds' metrics.jsonl and curve.jsonl, read from the run
    directories): FVU and dead fraction against training tokens, at DIR/figures/curves/<cell>.png. Cells whose run
    directories are gone are left out. Returns the figures drawn."""
    runs = _runs(record)
    drawn = []
    for cell, names in cells_of(record).items():
        data = [(_jsonl(out / runs[n]["dir"] / "metrics.jsonl"), _jsonl(out / runs[n]["dir"] / "curve.jsonl"),
                 int(runs[n]["metrics"].get("n_features") or 0)) for n in names]
        data = [d for d in data if (d[0] or d[1]) and d[2] > 0]
        if not data:
            continue
        if not drawn:
            rep.heading("Training curves", level=3)
            rep.paragraph("One figure per cell: the FVU (A) and the dead fraction (B) against training tokens, "
                          "mean and one standard deviation over the seeds. Held-out points come from curve.jsonl "
                          "(the preset's curve_tokens and the end), training points from metrics.jsonl; the training "
                          "window's dead fraction is drawn once a whole window has been seen.")
        path = fig_dir / "curves" / f"{cell}.png"
        seeds = f"{len(data)} seed{'s' if len(data) != 1 else ''}"
        if rep.add_figure(rfig.training_curve, (data,), path,
                          f"{cell} ({seeds}). A: FVU on the held-out tokens and of the training batches; B: dead "
                          "fraction in the training window and on the held-out tokens, against training tokens."):
            drawn.append(path)
    return drawn


def _step_details(rep: Report, record: dict[str, Any]) -> None:
    commands = record.get("commands") or []
    rep.paragraph(f"Step {record['name']}: {record['wall_seconds']:.1f} s wall time"
                  + (f" over {record['attempts']} attempts" if record["attempts"] > 1 else "")
                  + (f"; {len(commands)} equivalent command{'s' if len(commands) != 1 else ''}:" if commands else "."))
    if commands:
        rep.code("\n".join(commands))
