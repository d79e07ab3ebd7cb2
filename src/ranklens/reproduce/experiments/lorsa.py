"""Experiment 8: Lorsa with the default init against ASI (Section 5.4; Figure 9; App. K, O).

Lorsa layers replacing the middle layer's attention (input: its attention input, target: its attention output),
trained from the shared activation store with equal hyperparameters and seeds: the default init of App. O.2 against
ASI for Lorsa (per-head value subspaces and the MHSA's Q/K, App. K). Then the z pattern (Lorsa paper Section 4.1) of
the most active heads of the first ASI Lorsa on a short text.

Verdicts (one-sided Welch tests over seeds): ASI leaves fewer dead heads (not among the top K with a positive
activation within the last quarter of training, the same window rule as the SAEs), a lower FVU and a lower Delta LM
loss than the default init (Section 5.4: "This initialization sharply reduces dead parameters under identical
hyperparameters while improving reconstruction quality").
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ranklens.analysis.lorsa_interp import z_pattern_record
from ranklens.dictionaries.lorsa_io import open_lorsa
from ranklens.lm.capture import Capturer
from ranklens.report.html import Report
from ranklens.report.plots import heatmap
from ranklens.reproduce import figures as rfig
from ranklens.reproduce.commands import cli_command
from ranklens.reproduce.experiments.sae_runs import fmt_mean_std, mean_std, values
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, welch_less
from ranklens.train.config import LorsaTrainConfig
from ranklens.train.lorsa_job import METRICS_NAME, train_lorsa
from ranklens.train.trainer import remove_checkpoints

NAME = "lorsa"
LORSA_DIR = "lorsa"
TITLE = "8. Lorsa: default init against ASI (Figure 9, App. O)"
INITS = {"default": "default", "asi": "ASI"}
METRICS = {"train_dead_fraction": "dead-head fraction", "fvu": "FVU", "delta_lm_loss": "Delta LM loss"}
TOP_HEADS = 4  # heads shown in the z-pattern figure


@dataclass(frozen=True)
class LorsaCell:
    """One Lorsa run. The optional settings (the Lorsa paper's ablations and its heads experiment) default to the
    run's: d_qk the MHSA's d_head, the run's context length, trainable Q/K, the middle layer."""

    init: str
    heads: int
    qk_groups: int
    k: int
    tokens: int
    seed: int
    d_qk: int | None = None
    context: int | None = None
    qk_trainable: bool = True
    layer: int | None = None

    @property
    def name(self) -> str:
        extra = (([f"q{self.d_qk}"] if self.d_qk is not None else []) + ([f"c{self.context}"] if self.context else [])
                 + ([] if self.qk_trainable else ["fixedqk"]) + ([f"L{self.layer}"] if self.layer is not None else []))
        return "-".join([f"L-{self.init}-h{self.heads}-g{self.qk_groups}-k{self.k}-t{self.tokens}", *extra,
                         f"s{self.seed}"])


def lorsa_config(plan: Plan, cell: LorsaCell) -> LorsaTrainConfig:
    """The `train lorsa` config of a cell: from the run's store at the middle layer (a store per context length),
    captured on the fly at another layer."""
    c = plan.cfg
    layer = plan.mid if cell.layer is None else cell.layer
    context = cell.context or c.context_length
    store = plan.lorsa_store_dir(context) if layer == plan.mid else None
    return LorsaTrainConfig(model=c.model, layer=layer, heads=cell.heads, qk_groups=cell.qk_groups, k=cell.k,
                            d_qk=cell.d_qk, init=cell.init, qk_trainable=cell.qk_trainable,
                            init_tokens=c.init_tokens, corpus=c.corpus, store=None if store is None else str(store),
                            source="store" if store is not None else "stream",
                            tokens=cell.tokens, batch_tokens=c.lorsa_batch_tokens, lr=c.lorsa_lr,
                            warmup_steps=c.lorsa_warmup_steps, eval_tokens=c.eval_tokens,
                            lm_eval_tokens=c.lm_eval_tokens, seed=cell.seed, context_length=context,
                            output_bias=c.lorsa_output_bias, dtype=c.dtype, train_dtype=c.train_dtype,
                            device=c.device)


def train_cells(ctx, plan: Plan, cells: list[LorsaCell]) -> dict[str, dict[str, Any]]:
    """Train (or reuse) each cell in DIR/lorsa/<cell>: {name: {"cell", "dir", "metrics"}}. The stores they read are
    collected first."""
    out_dir = plan.out / LORSA_DIR
    runs = {}
    for i, x in enumerate(cells, 1):
        cached = (out_dir / x.name / METRICS_NAME).exists()
        if ctx.progress:
            print(f"  Lorsa {i}/{len(cells)} {x.name}" + (" (cached)" if cached else ""), file=sys.stderr, flush=True)
        cfg = lorsa_config(plan, x)
        if not cached and cfg.store is not None:
            ctx.lorsa_store(cfg.context_length)
        metrics = train_lorsa(cfg, out_dir / x.name, progress=ctx.progress, lm=None if cached else ctx.lm)
        remove_checkpoints(out_dir / x.name)
        runs[x.name] = {"cell": asdict(x), "dir": f"{LORSA_DIR}/{x.name}", "metrics": metrics}
    return runs


def _top_patterns(lorsa, lm, layer: int, text: str, context_length: int) -> list[dict[str, Any]]:
    """The z pattern (at its most active position) of each of the TOP_HEADS heads most active on `text`. The text
    is framed as `z_pattern_record` frames it (its record of head 0 gives the token ids)."""
    probe = z_pattern_record(lorsa, lm, layer, text, 0, context_length)
    x = torch.tensor([probe["token_ids"]], device=lm.device)
    site = f"L{layer}.attn_in"
    out = lorsa(Capturer(lm.arch, [site])(x)[site].to(lorsa.W_V.dtype))
    totals = torch.zeros(lorsa.n_heads, dtype=torch.float64)
    totals.index_add_(0, out.indices[0].reshape(-1).cpu(), out.values[0].clamp_min(0).reshape(-1).double().cpu())
    patterns = []
    for head in totals.argsort(descending=True)[:TOP_HEADS].tolist():
        record = z_pattern_record(lorsa, lm, layer, text, int(head), context_length)
        query = max(range(len(record["activation"])), key=lambda i: record["activation"][i])
        patterns.append({"head": int(head), "query": query, "query_token": record["tokens"][query],
                         "activation": record["activation"][query], "row": record["pattern"][query],
                         "tokens": record["tokens"]})
    return patterns


def cells(plan: Plan) -> dict[str, list[LorsaCell]]:
    """init -> its cells over the seeds."""
    c = plan.cfg
    heads = c.lorsa_expansion * plan.shape.d_model
    groups = c.lorsa_qk_groups_per_head * plan.shape.n_heads
    return {init: [LorsaCell(init, heads, groups, c.lorsa_k, c.lorsa_tokens, s) for s in c.seed_list()]
            for init in INITS}


def step(plan: Plan) -> Step:
    c = plan.cfg
    cells_by_init = cells(plan)
    out_dir = plan.out / LORSA_DIR
    layout = {"layer": plan.mid, "groups": {init: [x.name for x in cs] for init, cs in cells_by_init.items()},
              "zpattern_text": c.zpattern_text}
    all_cells = [x for cs in cells_by_init.values() for x in cs]
    commands = [cli_command("train lorsa", lorsa_config(plan, x), out_dir / x.name) for x in all_cells]

    def run(ctx) -> dict[str, Any]:
        runs = train_cells(ctx, plan, all_cells)
        first = out_dir / cells_by_init["asi"][0].name
        lorsa, _, _ = open_lorsa(first)
        patterns = _top_patterns(lorsa, ctx.lm, plan.mid, c.zpattern_text, c.context_length)
        return {"layout": layout, "runs": runs, "zpattern": {"run": cells_by_init["asi"][0].name, "heads": patterns}}

    config = {"layout": layout, "lorsa_runs": {x.name: lorsa_config(plan, x).model_dump(mode="json")
                                               for x in all_cells}}
    return Step(NAME, TITLE, run, config, commands)


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    g = result["layout"]["groups"]
    return [welch_less(f"Lorsa with ASI has a lower {label} than with the default init (Section 5.4, Figure 9)",
                       values(result, g["asi"], metric), values(result, g["default"], metric), name_a="ASI",
                       name_b="default", alpha=alpha).named(f"lorsa.{metric}")
            for metric, label in METRICS.items() if values(result, g["default"], metric)]


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    g = result["layout"]["groups"]
    m = result["runs"][g["asi"][0]]["metrics"]
    rep.paragraph(f"Layer {result['layout']['layer']}: {m['n_heads']:,} Lorsa heads in {m['n_qk_groups']} QK groups "
                  f"(d_qk = {m['d_qk']}), K = {m['k']}, {m['tokens']:,} training tokens, {len(g['asi'])} seeds per "
                  f"init; dead heads over the last {m['dead_window_tokens']:,} training tokens.")
    shown = {label: {INITS[init]: mean_std(values(result, g[init], metric)) for init in INITS}
             for metric, label in METRICS.items() if metric != "delta_lm_loss"}
    rep.add_figure(rfig.grouped_bars, (shown, "value"), fig_dir / "fig9_lorsa.png",
               "Dead-head fraction and FVU of Lorsa with the default init and with ASI (mean \u00b1 std over seeds) "
               "(cf. Figure 9).")
    rows = [[INITS[init]] + [fmt_mean_std(values(result, names, metric)) for metric in METRICS]
            + [fmt_mean_std(values(result, names, "eval_dead_fraction"))] for init, names in g.items()]
    rep.table(["init", *METRICS.values(), "dead fraction (held-out pass)"], rows,
              caption="Mean \u00b1 std over seeds")
    z = result["zpattern"]
    if z["heads"]:
        tokens = [t.replace("\n", "\\n") for t in z["heads"][0]["tokens"]]
        rep.add_figure(heatmap, ([h["row"] for h in z["heads"]],
                                       [f"head {h['head']} at {h['query_token']!r}" for h in z["heads"]], tokens),
                   fig_dir / "lorsa_zpattern.png",
                   f"z patterns of the {len(z['heads'])} most active heads of {z['run']} on "
                   f"{result['layout']['zpattern_text']!r}: the contribution A_ij v_j of each source token j to the "
                   "head's z at the query i where it is most active (Lorsa paper Section 4.1).")
    verdict_blocks(rep, found)
