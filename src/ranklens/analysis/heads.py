"""`ranklens heads`: find the attention heads (MHSA and Lorsa) that do a task (Lorsa paper Section 5.1, App. E.1,
App. F.3), from generated probes (``ranklens.analysis.probes``) scored by path patching, attribution and pattern share
(``ranklens.analysis.path_patching``).

A head's path-patching score is reported twice: the mean change of the metric over all the probe's rows (how much
the task depends on the head) and the mean over the rows where the head acts (an MHSA head acts everywhere; a Lorsa
head only where it is among the top K with z > 0). Heads are ranked by the second, among those acting on at least
MIN_ACTIVE_ROWS rows, so a narrow Lorsa head that does the task whenever it fires ranks by what it does. A head is
called a head of the task when all hold: it acts on at least MIN_ACTIVE_ROWS rows, its effect where active in the
task's direction (``sign * effect``) is at least ``threshold`` (metric units: logits, logit difference or nats), and at
least ``share`` of its attention (MHSA) or of its z pattern's mass (Lorsa, where active) falls on the task's source
positions. The model's own top-1 accuracy on each probe is reported next to it, so a task the model cannot do reads
as such.

Writes ``heads.json`` (and its view, ``heads.html``, ``ranklens.analysis.heads_report``) into the output directory: per task, the probe, the model's accuracy and mean metric, the check
that the position-wise path patching reproduces the model (largest metric difference), every MHSA head's scores, the
top Lorsa heads of each Lorsa with the z pattern of each at its strongest row; for the arithmetic task, the operand
plots of the top Lorsa heads (``ranklens.analysis.operands``, figure ``operands_L{layer}.png``); per Lorsa, the
heads with the highest broadcast score on corpus text (thematic anchors, ``ranklens.analysis.broadcast``); and, with
SAEs on the Lorsa's input and output, each shown head's App. G features (``ranklens.analysis.lorsa_features``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ranklens.analysis.broadcast import GAP, MIN_QUERIES, broadcast_scores
from ranklens.analysis.config import HeadsConfig
from ranklens.analysis.heads_report import write_heads_report
from ranklens.analysis.lorsa_features import ov_alignment, qk_impacts
from ranklens.analysis.lorsa_interp import z_pattern_of_ids
from ranklens.analysis.operands import operand_figure, operand_grid, operand_heuristic
from ranklens.analysis.path_patching import HeadScores, LorsaLayer, score_heads
from ranklens.analysis.probes import Probe, corpus_sequences, make_probe
from ranklens.data.tokenize import SpecialTokens
from ranklens.dictionaries.lorsa_io import open_lorsa
from ranklens.dictionaries.sae import SparseAutoencoder
from ranklens.errors import RanklensError
from ranklens.io import atomic_write_json
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel, load_model
from ranklens.lm.sites import parse_sites
from ranklens.progress import progress_bar

RESULTS_NAME = "heads.json"
Z_PATTERNS_PER_TASK = 3
TOP_FEATURES = 5
DASHBOARD_PAGE = "dashboard/index.html"
FEATURE_ROWS = 16  # a head's strongest activations on a probe over which App. G.1's largest KL is taken
BROADCAST_LENGTH = 128
MIN_BROADCAST_SEQUENCES = 5  # a head counted on fewer sequences is not ranked by its broadcast
MIN_ACTIVE_ROWS = 10  # a Lorsa head seen acting on fewer probe rows is not scored (its mean is noise)


def _layers(spec: str, n_layers: int) -> list[int]:
    pattern = ",".join(f"L{part.strip()}.attn_out" for part in spec.split(",") if part.strip())
    return sorted({site.layer for site in parse_sites(pattern, n_layers)})


def _head_rows(scores: HeadScores, sign: int, cfg: HeadsConfig, heads: list[int], n_rows: int) -> list[dict[str, Any]]:
    rows = []
    for h in heads:
        share = float(scores.pattern_share[h])
        active = int(scores.active_rows[h])
        effect = float(scores.path_patching[h])
        where_active = effect * n_rows / active if active else 0.0
        rows.append({"layer": scores.layer, "head": h, "path_patching": effect, "path_patching_active": where_active,
                     "attribution": float(scores.attribution[h]),
                     "pattern_share": None if share != share else share,  # NaN: never active at a row
                     "active_rows": active,
                     "function": bool(active >= MIN_ACTIVE_ROWS and sign * where_active >= cfg.threshold
                                      and share == share and share >= cfg.share)})
    return rows


def _ranked(rows: list[dict[str, Any]], sign: int) -> list[dict[str, Any]]:
    """Heads active on at least MIN_ACTIVE_ROWS rows, by their effect where active, in the task's direction."""
    kept = [r for r in rows if r["active_rows"] >= MIN_ACTIVE_ROWS]
    return sorted(kept, key=lambda r: -sign * r["path_patching_active"])


def best_with_share(rows: list[dict[str, Any]], sign: int, share: float) -> dict[str, Any] | None:
    """Among the heads with at least `share` of their pattern on the task's sources, the one with the largest effect
    where active in the task's direction; None when no head has the share."""
    shared = [r for r in rows if r["pattern_share"] is not None and r["pattern_share"] >= share]
    return max(shared, key=lambda r: sign * r["path_patching_active"], default=None)


def _task_result(lm: LoadedModel, probe: Probe, cfg: HeadsConfig, layers: list[int],
                 lorsas: list[tuple[str, LorsaLayer]], prefix: int, out: Path,
                 saes: tuple[SparseAutoencoder | None, SparseAutoencoder | None] = (None, None),
                 progress: bool = False) -> dict[str, Any]:
    run = score_heads(lm, probe, layers, [ll for _, ll in lorsas], prefix_length=prefix, progress=progress)
    R = probe.n_rows
    mhsa = [row for scores in run.mhsa
            for row in _head_rows(scores, probe.sign, cfg, list(range(len(scores.path_patching))), R)]
    lorsa_out = []
    for (directory, ll), scores in zip(lorsas, run.lorsa, strict=True):
        active = (scores.active_rows > 0).nonzero()[:, 0].tolist()
        rows = _ranked(_head_rows(scores, probe.sign, cfg, active, R), probe.sign)
        patterns = []
        for r in rows[:Z_PATTERNS_PER_TASK]:
            ids, pos = probe.row(int(scores.best_row[r["head"]]))
            patterns.append({**z_pattern_of_ids(ll.lorsa, lm, ll.layer, ids, r["head"]), "row_position": pos})
            if saes != (None, None):
                r["features"] = _features(lm, ll, r["head"], probe, scores.activations, *saes)
        site = Path(directory) / DASHBOARD_PAGE
        for r in rows[:cfg.top]:  # the head's page in the Lorsa's dashboard (`ranklens dashboard DIR`) when built
            r["dashboard"] = f"{site}#feature={r['head']}" if site.is_file() else None
        lorsa_out.append({"directory": directory, "layer": ll.layer, "n_heads": ll.lorsa.n_heads,
                          "heads_active": len(active), "top": rows[:cfg.top],
                          "function_heads": [r["head"] for r in rows if r["function"]],
                          "best_with_share": best_with_share(rows, probe.sign, cfg.share),
                          "z_patterns": patterns})
        if probe.task == "arithmetic" and cfg.operand_heads and rows:
            lorsa_out[-1]["operands"] = _operand_plots(lm, ll, [r["head"] for r in rows[:cfg.operand_heads]], out)
    return {"description": probe.description, "metric": probe.metric, "sign": probe.sign,
            "sequences": probe.n_sequences, "rows": probe.n_rows, "accuracy": run.accuracy,
            "model_metric": run.metric, "position_wise_error": run.position_wise_error,
            "mhsa_top": _ranked(mhsa, probe.sign)[:cfg.top], "mhsa_function_heads": [f"L{r['layer']}.H{r['head']}" for r in mhsa
                                                                        if r["function"]],
            "mhsa": mhsa, "lorsa": lorsa_out}


def _features(lm: LoadedModel, ll: LorsaLayer, head: int, probe: Probe, activations: torch.Tensor,
              sae_in: SparseAutoencoder | None, sae_out: SparseAutoencoder | None) -> dict[str, Any]:
    """App. G for one head: the input features moving its Q and K most (largest KL over its FEATURE_ROWS strongest
    activations on the probe) and the features aligned with its w_v and w_o."""
    found: dict[str, Any] = ov_alignment(ll.lorsa, head, sae_in, sae_out, top=TOP_FEATURES)
    if sae_in is None:
        return found
    mine = activations[activations[:, 1] == head]
    mine = mine[mine[:, 2].argsort(descending=True)][:FEATURE_ROWS]
    by_sequence: dict[tuple[int, ...], list[int]] = {}
    for r in mine[:, 0].long().tolist():
        ids, pos = probe.row(r)
        by_sequence.setdefault(tuple(ids), []).append(pos)
    site = f"L{ll.layer}.attn_in"
    best: dict[str, dict[int, float]] = {"q": {}, "k": {}}
    for ids, queries in by_sequence.items():
        x = Capturer(lm.arch, [site])(torch.tensor([ids], device=lm.device))[site][0]
        for which, impacts in qk_impacts(ll.lorsa, sae_in, x, head, queries).items():
            for f, kl in impacts.items():
                best[which][f] = max(kl, best[which].get(f, float("-inf")))
    for which, impacts in best.items():
        top = sorted(impacts.items(), key=lambda item: -item[1])[:TOP_FEATURES]
        found[which] = [{"feature": f, "kl": kl} for f, kl in top]
    return found


def _operand_plots(lm: LoadedModel, ll: LorsaLayer, heads: list[int], out: Path) -> dict[str, Any]:
    """Section 5.2: each head's activation over the 100 x 100 operand grid, its heuristic, and the figure."""
    grids = operand_grid(lm, ll.lorsa, ll.layer, heads)
    summaries = [{"head": h, **operand_heuristic(grid)} for h, grid in zip(heads, grids, strict=True)]
    titles = [f"Lorsa L{ll.layer}.{s['head']}: {s['description']}" for s in summaries]
    figure = operand_figure(grids.float(), titles, out / f"operands_L{ll.layer}.png")
    return {"figure": figure.name, "heads": summaries}


def _broadcast(lm: LoadedModel, directory: str, ll: LorsaLayer, sequences: list[list[int]], prefix: int,
               top: int) -> dict[str, Any]:
    """Section 5.3: the heads that read one keyword from many later positions, with the z pattern of the best."""
    scores = broadcast_scores(lm, ll.lorsa, ll.layer, sequences, prefix)
    ranked = [h for h in scores.score.nan_to_num(-1).argsort(descending=True).tolist()
              if scores.sequences[h] >= MIN_BROADCAST_SEQUENCES][:top]
    heads = [{"head": h, "broadcast": float(scores.score[h]), "sequences": int(scores.sequences[h])} for h in ranked]
    patterns = [z_pattern_of_ids(ll.lorsa, lm, ll.layer, sequences[int(scores.best[h])], h)
                for h in ranked[:Z_PATTERNS_PER_TASK]]
    return {"directory": directory, "layer": ll.layer, "sequences": len(sequences), "length": BROADCAST_LENGTH,
            "gap": GAP, "min_queries": MIN_QUERIES, "min_sequences": MIN_BROADCAST_SEQUENCES, "top": heads,
            "z_patterns": patterns}


def find_heads(cfg: HeadsConfig, out: str | Path, progress: bool = False) -> dict[str, Any]:
    """Run every task of `cfg`, write DIR/heads.json and return its content."""
    lm = load_model(cfg.model, cfg.dtype, cfg.device)
    if not lm.arch.causal:
        raise RanklensError(f"model {cfg.model!r} is not a causal LM; the head probes score next-token predictions")
    layers = _layers(cfg.layers, lm.arch.n_layers)
    lorsas = []
    for directory in cfg.lorsa:
        lorsa, meta, _ = open_lorsa(directory, cfg.device)
        if meta.get("model") not in (None, cfg.model) and Path(str(meta.get("model"))).name != Path(cfg.model).name:
            raise RanklensError(f"Lorsa {directory!r} was trained on {meta.get('model')!r}, not {cfg.model!r}")
        lorsas.append((str(directory), LorsaLayer(lorsa.eval(), int(meta["layer"]))))
    prefix = len(SpecialTokens.from_tokenizer(lm.tokenizer).prefix)
    saes = tuple(None if path is None else SparseAutoencoder.load(path, cfg.device)
                 for path in (cfg.input_sae, cfg.output_sae))
    for sae in saes:
        if sae is not None and sae.d_in != lm.arch.d_model:
            raise RanklensError(f"an SAE of width {sae.d_in} cannot read the attention of a model of width "
                                f"{lm.arch.d_model}")
    result: dict[str, Any] = {"model": cfg.model, "dtype": cfg.dtype, "layers": layers, "prompts": cfg.prompts,
                              "seed": cfg.seed, "threshold": cfg.threshold, "share": cfg.share, "tasks": {}}
    bar = progress_bar(len(cfg.tasks) + bool(lorsas and cfg.broadcast_sequences), "heads", unit="task",
                       enabled=progress)
    for task in cfg.tasks:
        probe = make_probe(task, lm.tokenizer, cfg.prompts, cfg.seed, cfg.corpus)
        with torch.no_grad():
            result["tasks"][task] = _task_result(lm, probe, cfg, layers, lorsas, prefix, Path(out), saes, progress)
        bar.update(1)
    if lorsas and cfg.broadcast_sequences:
        sequences = corpus_sequences(lm.tokenizer, cfg.corpus, cfg.seed, cfg.broadcast_sequences, BROADCAST_LENGTH)
        result["broadcast"] = [_broadcast(lm, directory, ll, sequences, prefix, cfg.top)
                               for directory, ll in lorsas]
        bar.update(1)
    bar.close()
    atomic_write_json(Path(out) / RESULTS_NAME, result)
    write_heads_report(result, Path(out))
    return result


def heads_table(result: dict[str, Any], n: int = 5) -> str:
    """The console summary: per task, the model's accuracy and the top heads (MHSA: effect, share; Lorsa: effect
    where active, active rows, share)."""
    lines = [f"{'task':<17} {'acc':>5}  top heads (path-patching effect, pattern share)"]
    for task, r in result["tasks"].items():
        mhsa = "  ".join(f"L{h['layer']}.H{h['head']} {h['path_patching']:+.2f} {h['pattern_share']:.2f}"
                         for h in r["mhsa_top"][:n])
        lines.append(f"{task:<17} {r['accuracy']:>5.2f}  {mhsa}")
        for lo in r["lorsa"]:
            heads = "  ".join(f"{h['head']} {h['path_patching_active']:+.2f} x{h['active_rows']} "
                              f"{'-' if h['pattern_share'] is None else format(h['pattern_share'], '.2f')}"
                              for h in lo["top"][:n])
            lines.append(f"{'':<17} {'':>5}  Lorsa L{lo['layer']}: {heads}")
    return "\n".join(lines)
