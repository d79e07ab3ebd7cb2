"""`ranklens dashboard`: the feature dashboard of a trained SAE or Lorsa, and the comparison of two.

The job reads top to bottom: open the dictionary (a `train sae` / `train lorsa` run directory, an SAELens or
LlamaScope SAE directory with ``--model`` and ``--site``, or a saved Lorsa directory), load its model, choose the
text (the run's held-out documents unless ``--corpus`` asks for other text), scan it once (``ranklens.dashboard.scan``),
compute what the decoder rows say on their own (``ranklens.dashboard.geometry``), and write the site
(``ranklens.dashboard.site_writer``; the data contract is in docs/dashboard.md) with ``summary.json`` beside it (the
per-feature numbers a comparison reads back).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ranklens.config import DEFAULT_CONTEXT_LENGTH
from ranklens.dashboard.config import DashboardConfig
from ranklens.dashboard.geometry import logit_directions, logit_effects, neighbours, subspace_share, unit_rows
from ranklens.dashboard.scan import Scan, Tokens, scan_lorsa, scan_sae
from ranklens.dashboard.site_reader import RANDOM_WINDOWS_NAME
from ranklens.dashboard.site_writer import write_compare, write_site
from ranklens.data.corpus import HeldOutSource
from ranklens.data.sequences import lorsa_sites
from ranklens.data.sources import held_out_text, recorded_held_out
from ranklens.dictionaries.init import resolve_d_init
from ranklens.dictionaries.load import load_sae
from ranklens.dictionaries.lorsa import Lorsa
from ranklens.dictionaries.lorsa_io import RUN_LORSA_DIR, open_lorsa
from ranklens.dictionaries.sae import SparseAutoencoder
from ranklens.errors import RanklensError
from ranklens.eval.jobs import RUN_SAE_DIR
from ranklens.io import read_json
from ranklens.linalg.basis import active_subspace, principal_basis
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel, load_model
from ranklens.lm.sites import Site
from ranklens.rundir import check_output_dir, read_run_config

SUMMARY_NAME = "summary.json"
DASHBOARD_DIR = "dashboard"  # the default --out inside a run directory
SHOWN_METRICS = ("fvu", "l0", "train_dead_fraction", "eval_dead_fraction", "dead_window_tokens", "delta_lm_loss",
                 "loss_recovered", "tokens", "n_features", "n_heads", "k", "init", "d_init", "b_dec_init", "optimizer",
                 "aux_k")


@dataclass
class Opened:
    """A dictionary ready to scan: what it is, its model and site, and the text its run held out."""

    kind: str  # "sae" | "lorsa"
    dictionary: SparseAutoencoder | Lorsa
    lm: LoadedModel
    site: Site  # the SAE's site, or the Lorsa layer's attention output
    text: HeldOutSource
    title: str
    metrics: dict[str, Any]
    source: Path


def _text(saved: dict | None, cfg: DashboardConfig, corpus: str, context: int) -> HeldOutSource:
    return held_out_text(saved, corpus=cfg.corpus, seed=cfg.seed, context_length=cfg.context_length,
                         default_corpus=corpus, default_context=context)


def open_dictionary(directory: str | Path, cfg: DashboardConfig) -> Opened:
    """Open any dictionary directory the dashboard accepts, with one-line errors for anything else."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RanklensError(f"{str(directory)!r} is not a directory; expected a `ranklens train sae` or `train lorsa` "
                            "run, an SAELens or LlamaScope SAE directory, or a Lorsa directory")
    metrics = read_json(directory / "metrics.json") if (directory / "metrics.json").exists() else {}
    if (directory / RUN_LORSA_DIR).is_dir() or (directory / "lorsa.safetensors").exists():
        lorsa, meta, run_dir = open_lorsa(directory, cfg.device)
        lm = load_model(cfg.model or meta["model"], cfg.dtype, cfg.device)
        if lm.arch.d_model != lorsa.d_model:
            raise RanklensError(f"{lm.name} has d_model {lm.arch.d_model} but the Lorsa expects {lorsa.d_model}")
        layer = int(meta["layer"])
        saved = meta.get("held_out")
        if saved is None and run_dir is not None and cfg.corpus is None:
            saved = recorded_held_out(meta["ranklens_config"], run_dir, lm, lorsa_layer=layer).to_json()
        text = _text(saved, cfg, meta.get("corpus", "default"), int(meta.get("context_length", DEFAULT_CONTEXT_LENGTH)))
        return Opened("lorsa", lorsa, lm, lm.arch.site(lorsa_sites(layer)[1]), text,
                      f"Lorsa of layer {layer} ({directory.name})", metrics, directory)
    run = read_run_config(directory, "train-sae") if (directory / RUN_SAE_DIR).is_dir() else None
    sae_dir = directory / RUN_SAE_DIR if run is not None else directory
    try:
        sae = load_sae(sae_dir, device=cfg.device)
    except RanklensError as err:
        raise RanklensError(f"{str(directory)!r} is not a dictionary run ({err})") from None
    model, site_name = cfg.model or (run or {}).get("model"), cfg.site or (run or {}).get("site")
    if model is None or site_name is None:
        raise RanklensError("--model and --site are needed for an SAE directory that is not a ranklens run")
    lm = load_model(model, cfg.dtype, cfg.device)
    site = lm.arch.site(site_name)
    if lm.arch.site_dim(site) != sae.d_in:
        raise RanklensError(f"site {site.name} of {model} has dimension {lm.arch.site_dim(site)} but the SAE expects "
                            f"d_in = {sae.d_in}; expected the model and site it was trained on")
    saved = None
    if run is not None and cfg.corpus is None:
        extra = read_json(sae_dir / "ranklens.json").get("extra", {}) if (sae_dir / "ranklens.json").exists() else {}
        saved = extra.get("held_out") or recorded_held_out(run, directory, lm).to_json()
    text = _text(saved, cfg, (run or {}).get("corpus", "default"),
                 (run or {}).get("context_length", DEFAULT_CONTEXT_LENGTH))
    return Opened("sae", sae, lm, site, text, f"SAE on {site.name} ({directory.name})", metrics, directory)


def decoder_rows(opened: Opened) -> torch.Tensor:
    return opened.dictionary.W_D if opened.kind == "sae" else opened.dictionary.W_O


def scan(opened: Opened, cfg: DashboardConfig, progress: bool) -> Scan:
    common = dict(n_top=cfg.n_top, n_sample=cfg.n_sample, seed=cfg.seed, progress=progress)
    if opened.kind == "sae":
        return scan_sae(opened.dictionary, opened.lm, opened.site, opened.text, cfg.tokens, **common)
    return scan_lorsa(opened.dictionary, opened.lm, opened.site.layer, opened.text, cfg.tokens,
                      attribution=cfg.attribution, **common)


class Vocabulary:
    """Token strings by id, decoded once each."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            if i not in self.cache:
                self.cache[i] = self.tokenizer.decode([i])
            out.append(self.cache[i])
        return out


@torch.no_grad()
def lorsa_z(opened: Opened, scanned: Scan, before: int, after: int) -> dict[tuple[int, int], list[float]]:
    """The z pattern over the context window of every top activation of every head: (head, token) -> [z per window
    position]. One forward per sequence that holds a top activation."""
    text, stats, lorsa = scanned.text, scanned.stats, opened.dictionary
    wanted: dict[int, list[tuple[int, int, int]]] = {}  # sequence -> (head, token, position in the text)
    for h in range(lorsa.n_heads):
        for token, _ in stats.top_entries(h):
            p = int(text.position[token])
            seq = int(torch.searchsorted(text.seq_starts, p, right=True)) - 1
            wanted.setdefault(seq, []).append((h, token, p))
    site_in = opened.lm.arch.site(lorsa_sites(opened.site.layer)[0])
    capture = Capturer(opened.lm.arch, [site_in])
    out = {}
    for seq, items in wanted.items():
        start, end = int(text.seq_starts[seq]), int(text.seq_starts[seq + 1])
        ids = text.flat_ids[start:end][None].to(opened.lm.device)
        x = capture(ids)[site_in.name][0].to(lorsa.W_V.dtype)
        heads = torch.tensor([h for h, _, _ in items], device=x.device)
        queries = torch.tensor([p - start for _, _, p in items], device=x.device)
        rows = lorsa.z_rows(x, heads, queries).float().cpu()
        for (h, token, p), row in zip(items, rows, strict=True):
            lo, hi = max(start, p - before), min(end, p + after + 1)
            out[(h, token)] = row[lo - start:hi - start].tolist()
    return out


def _context(text: Tokens, vocab: Vocabulary, token: int, feature: int, before: int, after: int,
             z: list[float] | None = None) -> dict:
    w = text.window(token, feature, before, after)
    ctx = {"tokens": vocab(w["ids"]), "acts": w["acts"], "peak": w["peak"], "doc": w["doc"], "pos": w["pos"]}
    if z is not None:
        ctx["z"] = z
    return ctx


def random_windows(text: Tokens, vocab: Vocabulary, n: int, before: int, after: int, seed: int) -> list[dict]:
    """``n`` windows around ordinary tokens drawn uniformly (without replacement, fixed by the seed), each with the
    code of every token in it: ``codes[j]`` lists ``[feature, act]`` of every feature active at token j. These are
    the random held-out contexts of Bills et al. (2023) that autointerp scores on (most features are 0 on them)."""
    if n == 0 or text.n == 0:
        return []
    g = torch.Generator().manual_seed(seed)
    centres = torch.randperm(text.n, generator=g)[:n].sort().values.tolist()
    out = []
    for token in centres:
        w = text.window(token, -1, before, after)  # feature -1: acts all zero; the codes come below
        codes = []
        for row in text.flat_rows[w["lo"]:w["lo"] + len(w["ids"])].tolist():
            if row < 0:
                codes.append([])
                continue
            vals, idx = text.values[row].tolist(), text.indices[row].tolist()
            codes.append([[int(f), round(float(v), 5)] for f, v in zip(idx, vals, strict=True) if v != 0])
        out.append({"tokens": vocab(w["ids"]), "peak": w["peak"], "doc": w["doc"], "pos": w["pos"], "codes": codes})
    return out


def _top_tokens(contexts: list[dict], n: int = 5) -> list[str]:
    seen: list[str] = []
    for ctx in contexts:
        token = ctx["tokens"][ctx["peak"]]
        if token not in seen:
            seen.append(token)
    return seen[:n]


def _number(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in SHOWN_METRICS if isinstance(metrics.get(k), int | float | str)}


def build_dashboard(directory: str | Path, cfg: DashboardConfig, out: str | Path | None = None,
                    progress: bool = True) -> Path:
    """Build the dashboard of the dictionary in ``directory`` into ``out`` (default DIR/dashboard); returns it."""
    out = check_output_dir(Path(out) if out is not None else Path(directory) / DASHBOARD_DIR)
    opened = open_dictionary(directory, cfg)
    scanned = scan(opened, cfg, progress)
    stats, text, lm = scanned.stats, scanned.text, opened.lm
    w = decoder_rows(opened).detach()
    n = w.shape[0]

    basis = principal_basis(scanned.covariance)
    dim = resolve_d_init(cfg.subspace_dim, basis)
    shares = subspace_share(w, active_subspace(basis, dim))
    near_ids, near_cos = neighbours(w, cfg.neighbours)
    logits = logit_directions(lm) if opened.site.kind in ("attn_out", "mlp_out", "resid_pre", "resid_post") else None
    effects = logit_effects(w, logits[0], logits[1], k=cfg.logit_tokens) if logits is not None else iter(())
    z = lorsa_z(opened, scanned, cfg.before, cfg.after) if opened.kind == "lorsa" else {}
    attribution = scanned.attribution.result() if scanned.attribution is not None else None
    attributed = {h["head"]: h for h in attribution["heads"]} if attribution is not None else {}
    vocab = Vocabulary(lm.tokenizer)
    density, mean = stats.density(), stats.mean()

    tops = {f: [_context(text, vocab, t, f, cfg.before, cfg.after, z.get((f, t))) for t, _ in stats.top_entries(f)]
            for f in range(n)}
    index = [{"id": f, "density": float(density[f]), "mean_act": _number(float(mean[f])),
              "max_act": float(stats.max[f]), "alive": bool(stats.count[f] > 0), "subspace_share": float(shares[f]),
              "top_tokens": _top_tokens(tops[f]), **({"qk_group": opened.dictionary.group_of(f)}
                                                     if opened.kind == "lorsa" else {})} for f in range(n)]

    def records() -> Iterator[dict]:
        effect = next(effects, None)
        for f in range(n):
            rec = {**{k: index[f][k] for k in ("id", "density", "mean_act", "max_act", "alive", "subspace_share")},
                   "top": tops[f], **({"act_histogram": stats.histogram(f)} if stats.count[f] > 0 else {}),
                   "quantiles": [{"label": q["label"], "range": q["range"],
                                  "examples": [_context(text, vocab, t, f, cfg.before, cfg.after)
                                               for t, _ in q["examples"]]} for q in stats.intervals(
                                                   f, cfg.intervals, cfg.per_interval)],
                   "neighbours": [[int(i), float(c)] for i, c in zip(near_ids[f], near_cos[f], strict=True)]}
            if effect is not None and effect[0] == f:
                _, up, down, hist = effect
                rec["logits"] = {"promoted": [[vocab([t])[0], v] for t, v in up],
                                 "suppressed": [[vocab([t])[0], v] for t, v in down], "histogram": hist}
                effect = next(effects, None)
            if opened.kind == "lorsa":
                a = attributed.get(f)
                ranked = sorted(enumerate(a["contributions"]), key=lambda iv: -iv[1])[:8] if a else []
                rec["lorsa"] = {"qk_group": opened.dictionary.group_of(f),
                                "attribution": [[f"L{opened.site.layer}.H{i}", c] for i, c in ranked],
                                "heads_for_90pct": a["heads_for_90pct"] if a else None}
            yield rec

    n_dead = sum(1 for row in index if not row["alive"])
    meta = {"kind": opened.kind, "title": opened.title, "model": lm.name, "corpus": opened.text.corpus,
            "n_features": n, "d": w.shape[1], "tokens": text.n,
            "dead_definition": f"dead = never fired on the {text.n:,} held-out tokens scanned for this page",
            "n_dead": n_dead, "subspace_dim": dim,
            "logit_note": logits[2] if logits is not None else (
                "No logit effects: the decoder rows do not live in the residual stream of a causal LM here."),
            "metrics": _metrics(opened.metrics), "source": str(opened.source),
            "held_out": opened.text.to_json(), **({"site": opened.site.name} if opened.kind == "sae"
                                                  else {"layer": opened.site.layer})}
    summary = {"kind": opened.kind, "title": opened.title, "n_features": n, "n_dead": n_dead, "tokens": text.n,
               "subspace_dim": dim, "density": [r["density"] for r in index],
               "subspace_share": [r["subspace_share"] for r in index]}
    windows = random_windows(text, vocab, cfg.random_windows, cfg.before, cfg.after, cfg.seed)
    return write_site(out, meta, index, records(), extra_files={
        SUMMARY_NAME: json.dumps(summary).encode(),
        RANDOM_WINDOWS_NAME: json.dumps({"windows": windows}).encode()})


# --------------------------------------------------------------------------- comparison


def _log_histogram(values: list[float], lo: float = -8.0, hi: float = 0.0, bins: int = 32) -> dict:
    logs = torch.tensor([math.log10(v) for v in values if v > 0] or [lo], dtype=torch.float64).clamp(lo, hi)
    counts = torch.histc(logs, bins=bins, min=lo, max=hi) if any(v > 0 for v in values) else torch.zeros(bins)
    return {"edges": torch.linspace(lo, hi, bins + 1).tolist(), "counts": [int(c) for c in counts.tolist()]}


def _share_histogram(values: list[float], bins: int = 20) -> dict:
    counts = torch.histc(torch.tensor(values, dtype=torch.float64), bins=bins, min=0.0, max=1.0)
    return {"edges": torch.linspace(0, 1, bins + 1).tolist(), "counts": [int(c) for c in counts.tolist()]}


def compare_dashboards(run_a: str | Path, run_b: str | Path, out: str | Path, cfg: DashboardConfig,
                       progress: bool = True) -> Path:
    """The comparison page of two dictionaries on the same site: density and subspace-share distributions and dead
    shares side by side, and each feature of A paired with the feature of B whose decoder row is nearest (cosine).
    Each run's own dashboard is built first when it has none (RUN/dashboard)."""
    out = check_output_dir(out)
    sides = {}
    for key, run in (("a", Path(run_a)), ("b", Path(run_b))):
        site = run / DASHBOARD_DIR if not (run / SUMMARY_NAME).exists() else run
        if not (site / SUMMARY_NAME).exists():
            build_dashboard(run, cfg, site, progress)
        sides[key] = (run, site, read_json(site / SUMMARY_NAME))
    w = {k: _decoder_of(run) for k, (run, _, _) in sides.items()}
    if w["a"].shape[1] != w["b"].shape[1]:
        raise RanklensError(f"the two dictionaries live in different spaces (d = {w['a'].shape[1]} and "
                            f"{w['b'].shape[1]}); expected two dictionaries of the same site")
    ua, ub = unit_rows(w["a"]), unit_rows(w["b"])
    best_cos, best_id = torch.empty(ua.shape[0]), torch.empty(ua.shape[0], dtype=torch.int64)
    step = max(1, (1 << 24) // max(ub.shape[0], 1))
    for i in range(0, ua.shape[0], step):
        best_cos[i:i + step], best_id[i:i + step] = (ua[i:i + step] @ ub.T).max(dim=1)
    pairs = [[i, int(best_id[i]), float(best_cos[i])] for i in range(ua.shape[0])]
    out = Path(out)
    runs = {}
    for key, (_, site, summary) in sides.items():
        runs[key] = {"title": summary["title"], "n_features": summary["n_features"], "n_dead": summary["n_dead"],
                     "density_histogram": _log_histogram(summary["density"]),
                     "subspace_histogram": _share_histogram(summary["subspace_share"]),
                     "site_href": _relative(site, out)}
    cosine = torch.histc(best_cos.double(), bins=20, min=-1.0, max=1.0)
    data = {"a": runs["a"], "b": runs["b"], "pairs": pairs,
            "cosine_histogram": {"edges": torch.linspace(-1, 1, 21).tolist(),
                                 "counts": [int(c) for c in cosine.tolist()]}}
    return write_compare(out, data)


def _decoder_of(run: Path) -> torch.Tensor:
    """The decoder rows of a dictionary directory, without its model."""
    if (run / RUN_LORSA_DIR).is_dir() or (run / "lorsa.safetensors").exists():
        return open_lorsa(run, "cpu")[0].W_O.detach()
    sae_dir = run / RUN_SAE_DIR if (run / RUN_SAE_DIR).is_dir() else run
    return load_sae(sae_dir, device="cpu").W_D.detach()


def _relative(site: Path, out: Path) -> str:
    return Path(os.path.relpath(site.resolve(), out.resolve())).as_posix() + "/"
