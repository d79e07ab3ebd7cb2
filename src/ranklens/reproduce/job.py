"""`ranklens reproduce --model M --preset {quick,standard,paper} --out DIR`: the paper's experiments as one pipeline.

Steps, each cached in DIR (``pipeline``): the spectrum of every layer (experiment 1) and the W_O analysis read from it
(2); the SAE activation store (collected once, shared by every SAE); the dead-feature sweep over layers (3); ASI
against TopK and AuxK (4); the controls (5); scaling with SparseAdam (6); the dead-subspace analysis (7); Lorsa with
the default init against ASI (8). Then
DIR/results.json and DIR/report.html with the verdicts (``report``).

Where things go: DIR/config.yaml (the resolved config), DIR/steps/*.json (one record per finished step),
DIR/spectrum/ (the spectrum job), DIR/stores/sae/ (the activation store; only needed while SAE steps run, so it may
be deleted once the run is finished), DIR/sae/<run>/ (one `ranklens train sae` run directory per cell; a step
trains its cells of one seed and token budget as one group on one pass over the store, ``Context.train_all``),
DIR/lorsa/<run>/ (one `ranklens train lorsa` run directory per cell),
DIR/figures/, DIR/results.json, DIR/report.html.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranklens.errors import RanklensError
from ranklens.reproduce import report
from ranklens.reproduce.commands import cli_command
from ranklens.reproduce.context import Context
from ranklens.reproduce.experiments import (
    asi,
    budget,
    controls,
    dashboards,
    dead_subspace,
    dead_vs_rank,
    heads,
    lorsa,
    lorsa_scaling,
    low_rank,
    lr_sweep,
    qk_ablations,
    scaling,
    wo,
)
from ranklens.reproduce.pipeline import Step, finished_elsewhere, run_steps
from ranklens.reproduce.plan import ModelShape, Plan
from ranklens.reproduce.presets import ReproduceConfig
from ranklens.rundir import open_run_dir, read_run_config

EXPERIMENTS = [low_rank, wo, dead_vs_rank, asi, controls, scaling, dead_subspace, lorsa, lr_sweep, budget, dashboards,
               qk_ablations, lorsa_scaling, heads]
# Experiments that train nothing from the run's activation store (the heads experiment captures on the fly).
WITHOUT_STORE = {"heads"}
# Experiments that read another's record: the W_O analysis and the dead-feature sweep read the spectrum job's.
NEEDS = {"wo": "low_rank", "dead_vs_rank": "low_rank"}


def selected(cfg: ReproduceConfig) -> list:
    """The experiment modules this run runs, in pipeline order: those asked for, what they need, and the lr sweep
    before experiment 9 when the preset sweeps."""
    names = set(cfg.experiments) | {NEEDS[n] for n in cfg.experiments if n in NEEDS}
    if "budget" in names and cfg.lr_sweep:
        names.add("lr_sweep")
    return [m for m in EXPERIMENTS if m.NAME in names]


def activations_step(plan: Plan) -> Step:
    """The activation store every SAE trains from (`ranklens collect`): the sweep's sites and the middle layer's.

    With ``--reuse``, a job whose store settings match one of those directories takes that record and collects
    nothing here: the store is collected on first use (``Context.store``), so a last job of a split run whose SAE
    runs were all trained by earlier jobs reads no activations at all."""
    cfg = plan.collect_config()
    config = {"collect": cfg.model_dump(mode="json")}

    def run(ctx) -> dict[str, Any]:
        elsewhere = finished_elsewhere(plan.cfg.reuse, "activations", config)
        if elsewhere:
            source, result = elsewhere[0]
            return {**result, "reused_from": str(source)}
        store = ctx.store()
        return {"store": str(plan.store_dir.relative_to(plan.out)), "n_tokens": store.n_tokens,
                "docs_consumed": store.docs_consumed, "sites": ", ".join(store.sites)}

    return Step("activations", "SAE activation store", run, config, [plan.collect_command()])


def steps(plan: Plan) -> list[Step]:
    chosen = selected(plan.cfg)
    first = [m for m in chosen if m in (low_rank, wo)]
    rest = [m for m in chosen if m not in first]
    store = any(m.NAME not in WITHOUT_STORE for m in rest)
    return [m.step(plan) for m in first] + ([activations_step(plan)] if store else []) + [m.step(plan) for m in rest]


SPLIT_FIELDS = ("seeds", "only_seeds", "reuse")  # what may differ between the jobs of one split run


def check_reuse(cfg: ReproduceConfig) -> None:
    """Every --reuse directory is a reproduce run with this run's settings, the seeds aside; else a one-line error
    before any work starts."""
    ours = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in SPLIT_FIELDS}
    for d in cfg.reuse:
        try:
            theirs = read_run_config(d, "reproduce")
        except RanklensError as e:
            raise RanklensError(f"--reuse {d!r}: {e}") from None
        differ = sorted(k for k in ours.keys() | theirs.keys() if k not in SPLIT_FIELDS and ours.get(k) != theirs.get(k))
        if differ:
            shown = "; ".join(f"{k}: {ours.get(k)!r} here, {theirs.get(k, 'unset')!r} there" for k in differ[:3])
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise RanklensError(f"--reuse {d!r} ran with other settings ({shown}{more}); only "
                                f"{', '.join(SPLIT_FIELDS)} may differ")


def reproduce(cfg: ReproduceConfig, out: str | Path, progress: bool = True, command: str | None = None,
              ) -> dict[str, Any]:
    """Run (or resume, or reuse) every step in `out`, then write results.json and report.html; returns the
    results."""
    command = command or cli_command("reproduce", cfg, out, base=ReproduceConfig.load(preset=cfg.preset,
                                                                                      paper=cfg.paper))
    check_reuse(cfg)
    with open_run_dir(out, cfg, "reproduce") as run_dir:
        plan = Plan(cfg, run_dir, ModelShape.of(cfg.model))
        records = run_steps(run_dir, steps(plan), Context(plan, progress), progress)
        info = {"n_layers": plan.shape.n_layers, "d_model": plan.shape.d_model, "middle_layer": plan.mid,
                "sweep_layers": plan.sweep_layers, "main_site": plan.main_site, "resid_site": plan.resid_site}
        return report.build(run_dir, cfg, info, selected(cfg), records, command)
