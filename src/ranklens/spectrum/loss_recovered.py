"""Fraction of the downstream loss recovered by the top-n singular components of a site (paper App. B, Figure 3b).

The site is replaced by mean + (x - mean) V_n V_n^T on held-out text (the documents after those the spectrum
accumulated), and (CE_zero - CE_n) / (CE_zero - CE_clean) is measured over a geometric grid of n, then bisected to
the smallest n recovering 99%. Each site's curve is cached in the job's state directory as soon as it is done.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ranklens.data.corpus import iter_documents, splits_documents
from ranklens.data.tokenize import TokenBatch, first_tokens, token_batches
from ranklens.errors import RanklensError
from ranklens.eval.lm_loss import cross_entropies, layer_inputs, zero_ablation
from ranklens.io import atomic_write_json, read_json
from ranklens.linalg.basis import PrincipalBasis, principal_basis
from ranklens.lm.load import LoadedModel
from ranklens.lm.sites import Architecture, Site
from ranklens.spectrum.config import SpectrumConfig


def held_out_batches(lm: LoadedModel, cfg: SpectrumConfig, skip_docs: int) -> list[TokenBatch]:
    """Whole sequences of the documents after the accumulated ones, until `loss_tokens` tokens."""
    batches = first_tokens(token_batches(itertools.islice(iter_documents(cfg.corpus, seed=cfg.seed), skip_docs, None), lm.tokenizer, cfg.context_length,
                                         cfg.batch_tokens, split=splits_documents(cfg.corpus)), cfg.loss_tokens)
    if not batches:
        raise RanklensError(f"corpus {cfg.corpus!r} has no documents left for held-out loss evaluation after "
                            f"{skip_docs} documents; lower --tokens or use a larger corpus")
    return batches


def subspace_projection(mean: torch.Tensor, basis: torch.Tensor):
    """x -> mean + (x - mean) V_n V_n^T (App. B), computed in float32; n = basis.shape[1] (n = 0 gives the mean)."""
    mean32, v32 = mean.float(), basis.float()

    def project(x: torch.Tensor) -> torch.Tensor:
        centered = x.float() - mean32
        return mean32 + (centered @ v32) @ v32.T

    return project


def _grid(d: int, points: int) -> list[int]:
    geometric = {int(round(v)) for v in torch.logspace(0, math.log10(d), max(points, 2)).tolist()}
    return sorted(geometric | {0, d})


def loss_recovered_curve(lm: LoadedModel, arch: Architecture, site: Site, mean: torch.Tensor,
                         basis: PrincipalBasis, batches: list[TokenBatch], ce_clean: float, ce_zero: float,
                         points: int, target: float = 0.99, prefixes: list | None = None,
                         on_evaluated: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fraction of loss recovered against kept components n, and the smallest n reaching `target`. `prefixes`
    (`layer_inputs` of the site's layer on `batches`) saves recomputing the layers before the site per evaluation.
    `on_evaluated(n_done, n)` is called after each evaluation (for a progress display)."""
    d = basis.eigenvectors.shape[0]
    ce_by_n: dict[int, float] = {}

    def evaluate(ns: list[int]) -> None:
        todo = [n for n in ns if n not in ce_by_n]
        fns = {str(n): subspace_projection(mean, basis.eigenvectors[:, :n]) for n in todo}
        for n in todo:  # one at a time, so a progress display moves with every evaluation
            ce_by_n[n] = cross_entropies(lm.model, arch, batches, site, {str(n): fns[str(n)]},
                                         prefixes=prefixes)[str(n)]
            if on_evaluated is not None:
                on_evaluated(len(ce_by_n), n)

    def frac(n: int) -> float:
        return (ce_zero - ce_by_n[n]) / (ce_zero - ce_clean)

    grid = _grid(d, points)
    evaluate(grid)
    reached = [n for n in grid if frac(n) >= target]
    n_target = None
    if reached:  # bisect between the last grid point below the target and the first at or above it
        hi = reached[0]
        lo = max([n for n in grid if n < hi and frac(n) < target], default=hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            evaluate([mid])
            lo, hi = (mid, hi) if frac(mid) < target else (lo, mid)
        n_target = hi
    ns = sorted(ce_by_n)
    return {"n": ns, "fraction": [frac(n) for n in ns], "ce": [ce_by_n[n] for n in ns], "ce_clean": ce_clean,
            "ce_zero": ce_zero, "n_99": n_target, "frac_dims_99": None if n_target is None else n_target / d,
            "n_tokens": sum(b.n_tokens for b in batches), "target": target}


def loss_recovered(lm, arch, cfg, state, loss_sites, by_name, state_dir: Path, progress: bool) -> None:
    """App. B curves, one site at a time, each cached in the state directory as soon as it is done."""
    batches = held_out_batches(lm, cfg, state.docs_done)
    cache_path = state_dir / "loss_recovered.json"
    cache = read_json(cache_path) if cache_path.exists() else {}
    prefixes: dict[int, list] = {}  # the input of each site's layer, captured once for all its evaluations
    bar = tqdm(loss_sites, desc="loss recovered", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for site in bar:
        if site.name not in cache:
            bar.set_postfix_str(f"{site.name}: clean and zero-ablated loss")
            acc = state.full(site.name)
            if site.layer not in prefixes:
                prefixes[site.layer] = layer_inputs(lm.model, arch, batches, site)
            ce = cross_entropies(lm.model, arch, batches, site, {"clean": None, "zero": zero_ablation},
                                 prefixes=prefixes[site.layer])
            cache[site.name] = loss_recovered_curve(lm, arch, site, acc.mean, principal_basis(acc), batches,
                                                    ce["clean"], ce["zero"], cfg.loss_points,
                                                    prefixes=prefixes[site.layer],
                                                    on_evaluated=lambda done, n, name=site.name: bar.set_postfix_str(
                                                        f"{name}: {done} evaluations, last n = {n}"))
            atomic_write_json(cache_path, cache)
        by_name[site.name]["loss_recovered"] = cache[site.name]
