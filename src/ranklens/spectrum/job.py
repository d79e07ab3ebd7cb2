"""`ranklens spectrum`: the dimensional-collapse measurements of Section 4 for every requested site.

Steps, each cached in the run directory so a rerun resumes or reuses them:

1. accumulate: one (early-stopped) forward pass per batch feeds a float64 covariance accumulator per site; with
   `splits > 1` the batches are dealt round-robin to disjoint split accumulators (App. C) whose merge is the full
   one. With `exclude_outliers`, norm statistics from a calibration prefix set the footnote-3 bound first. The
   state is checkpointed every `checkpoint_seconds`, and a killed run continues from its last checkpoint.
2. statistics per site (Definition 4.1, Section 4.3): singular values, effective rank, share above 1%, etc.
3. loss recovered (App. B) for `loss_recovered` sites on held-out documents (those after the accumulated ones):
   the site replaced by mean + (x - mean) V_n V_n^T for n on a geometric grid, then bisection for the smallest n
   that recovers 99%.
4. W_O decomposition (Section 4.4) for `decompose` layers, from the attn_z and attn_out accumulators.
5. comparisons (Figure 2 middle/right): the same measurement on other models or corpora, as sub-runs.
6. spectrum.json, figures and report.html.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from tqdm import tqdm

from ranklens.data.corpus import iter_documents, splits_documents
from ranklens.data.tokenize import token_batches
from ranklens.distributed import broadcast_error, rank_device, world
from ranklens.errors import RanklensError
from ranklens.io import atomic_write_bytes, atomic_write_json, read_json
from ranklens.linalg.accumulator import CovarianceAccumulator, NormStats
from ranklens.linalg.basis import principal_basis
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel, load_model, max_positions
from ranklens.lm.sites import Architecture, Site, parse_sites
from ranklens.lock import DirectoryLock
from ranklens.rundir import check_output_dir, prepare_run_dir
from ranklens.spectrum.config import SpectrumConfig
from ranklens.spectrum.distributed import gather_accumulators
from ranklens.spectrum.loss_recovered import loss_recovered
from ranklens.spectrum.stats import spectrum_summary, stability_summary, variance_decomposition

RESULT_NAME = "spectrum.json"
_STATE_NAME = "accumulators.safetensors"


# --------------------------------------------------------------------------- step 1: accumulation


@dataclass
class AccumulationState:
    """Per site, one accumulator per split (one when the site keeps no splits), plus the data position."""

    accs: dict[str, list[CovarianceAccumulator]]
    norms: dict[str, NormStats] = field(default_factory=dict)
    docs_done: int = 0
    tokens_done: int = 0
    batches_done: int = 0
    complete: bool = False

    def full(self, site: str) -> CovarianceAccumulator:
        return CovarianceAccumulator.merge_all(self.accs[site])

    def save(self, path: Path) -> None:
        tensors, meta = {}, {"docs_done": self.docs_done, "tokens_done": self.tokens_done,
                             "batches_done": self.batches_done, "complete": self.complete, "accs": {},
                             "norms": {k: v.state_dict() for k, v in self.norms.items()}}
        for site, parts in self.accs.items():
            counts = []
            for i, acc in enumerate(parts):
                state = acc.state_dict()
                tensors[f"{site}/{i}/mean"] = state["mean"]
                tensors[f"{site}/{i}/scatter"] = state["scatter"]
                counts.append([state["n"], state["n_excluded"]])
            meta["accs"][site] = counts
        atomic_write_bytes(path, save_tensors(tensors, metadata={"state": json.dumps(meta)}))

    @classmethod
    def load(cls, path: Path, gram_dtype: torch.dtype, clip: float | None) -> AccumulationState:
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads(f.metadata()["state"])
                accs = {site: [CovarianceAccumulator.from_state_dict(
                    {"n": n, "n_excluded": n_ex, "mean": f.get_tensor(f"{site}/{i}/mean"),
                     "scatter": f.get_tensor(f"{site}/{i}/scatter")}, norm_clip_sigma=clip, gram_dtype=gram_dtype)
                    for i, (n, n_ex) in enumerate(counts)] for site, counts in meta["accs"].items()}
        except (OSError, KeyError, ValueError) as err:
            raise RanklensError(f"checkpoint {str(path)!r} is unreadable ({err}); delete it to start over") from err
        norms = {k: NormStats.from_state_dict(v) for k, v in meta["norms"].items()}
        return cls(accs, norms, meta["docs_done"], meta["tokens_done"], meta["batches_done"], meta["complete"])


def _documents(cfg: SpectrumConfig, skip: int):
    return itertools.islice(iter_documents(cfg.corpus, seed=cfg.seed), skip, None)


def _calibrate_norms(lm: LoadedModel, capture: Capturer, cfg: SpectrumConfig) -> dict[str, NormStats]:
    """Footnote 3: norm statistics per site from the first `outlier_calibration_tokens` tokens."""
    norms = {name: NormStats() for name in capture.names}
    seen = 0
    for batch in token_batches(_documents(cfg, 0), lm.tokenizer, cfg.context_length, cfg.batch_tokens,
                               split=splits_documents(cfg.corpus)):
        acts = capture(batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device))
        for name, a in acts.items():
            norms[name].update(a[batch.stat_mask.to(a.device)])
        seen += batch.n_tokens
        if seen >= cfg.outlier_calibration_tokens:
            break
    return norms


def accumulate(lm: LoadedModel, sites: list[Site], split_sites: set[str], cfg: SpectrumConfig, state_dir: Path,
               progress: bool, distributed: bool = False) -> AccumulationState:
    """The accumulators of every site over `cfg.tokens` tokens (resumed from, and checkpointed to, `state_dir`).

    With `distributed` (inside a torchrun process group of W ranks), every rank walks the same sequence of batches
    and runs the model on those whose index is its rank modulo W, so the union of the ranks' data is exactly the
    one-process run's; each rank checkpoints its own part, and rank 0 receives the merged state (saved as the
    complete one-process state, so any later run reuses it). The other ranks get their own part back."""
    gram_dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.gram_dtype]
    clip = cfg.outlier_sigma if cfg.exclude_outliers else None
    path = state_dir / _STATE_NAME
    rank, size = world() if distributed else (0, 1)
    if path.exists():  # a complete merged state of an earlier run (or a one-process run's, complete or not)
        state = AccumulationState.load(path, gram_dtype, clip)
        if state.complete or size == 1:
            return _accumulate_own(lm, sites, split_sites, cfg, path, state, gram_dtype, clip, progress, 0, 1)
    own_path = path if size == 1 else state_dir / f"accumulators.rank{rank}-of-{size}.safetensors"
    state = AccumulationState.load(own_path, gram_dtype, clip) if own_path.exists() else None
    state = _accumulate_own(lm, sites, split_sites, cfg, own_path, state, gram_dtype, clip, progress and rank == 0,
                            rank, size)
    if size == 1:
        return state
    names = list(state.accs)
    merged = gather_accumulators([acc for name in names for acc in state.accs[name]])
    if merged is None:
        return state
    parts = iter(merged)
    state.accs = {name: [next(parts) for _ in state.accs[name]] for name in names}
    state.save(path)
    return state


def _accumulate_own(lm: LoadedModel, sites: list[Site], split_sites: set[str], cfg: SpectrumConfig, path: Path,
                    state: AccumulationState | None, gram_dtype: torch.dtype, clip: float | None, progress: bool,
                    rank: int, size: int) -> AccumulationState:
    """This rank's share (every batch when size == 1) of the accumulation, checkpointed to `path`."""
    capture = Capturer(lm.arch, sites)
    if state is None:
        arch = capture.arch
        state = AccumulationState({
            s.name: [CovarianceAccumulator(arch.site_dim(s), norm_clip_sigma=clip, gram_dtype=gram_dtype)
                     for _ in range(cfg.splits if s.name in split_sites else 1)] for s in sites})
        if cfg.exclude_outliers:
            state.norms = _calibrate_norms(lm, capture, cfg)
    if state.complete:
        return state
    bar = tqdm(total=cfg.tokens, initial=state.tokens_done, unit="tok", desc="spectrum", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    last_save = time.monotonic()
    # Split documents (a long document cut into contexts) can stop a checkpoint mid-document: resume by skipping
    # the batches done (the same on every run) rather than the documents done.
    splits = splits_documents(cfg.corpus)
    batches = token_batches(_documents(cfg, 0 if splits else state.docs_done), lm.tokenizer, cfg.context_length,
                            cfg.batch_tokens, split=splits)
    if splits:
        batches = itertools.islice(batches, state.batches_done, None)
    for batch in batches:
        if state.tokens_done >= cfg.tokens:
            break
        take = min(batch.n_tokens, cfg.tokens - state.tokens_done)  # exactly `tokens` tokens in all
        split = state.batches_done % cfg.splits
        if state.batches_done % size == rank:
            acts = capture(batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device))
            for name, a in acts.items():
                rows = a[batch.stat_mask.to(a.device)][:take]
                parts = state.accs[name]
                parts[split % len(parts)].update(rows, norm_bounds=state.norms.get(name))
        state.docs_done += batch.n_docs
        state.tokens_done += take
        state.batches_done += 1
        bar.update(take)
        if time.monotonic() - last_save > cfg.checkpoint_seconds:
            state.save(path)
            last_save = time.monotonic()
    bar.close()
    if state.tokens_done < cfg.tokens:
        print(f"warning: corpus {cfg.corpus!r} ran out after {state.tokens_done} of {cfg.tokens} tokens",
              file=sys.stderr)
    if state.tokens_done == 0:
        raise RanklensError(f"corpus {cfg.corpus!r} gave no tokens; expected non-empty text")
    state.complete = True
    state.save(path)
    return state


# --------------------------------------------------------------------------- the job


def _layers(spec: str, n_layers: int) -> list[int]:
    return sorted({s.layer for s in parse_sites(f"L{spec}.attn_out", n_layers)})


def _sites(cfg: SpectrumConfig, arch: Architecture) -> tuple[list[Site], list[int]]:
    sites = set(parse_sites(cfg.sites, arch.n_layers))
    layers = _layers(cfg.decompose, arch.n_layers) if cfg.decompose else []
    for layer in layers:  # the decomposition needs both ends of W_O
        sites |= {Site(layer, "attn_z"), Site(layer, "attn_out")}
    return sorted(sites), layers


def _decomposition(state: AccumulationState, arch: Architecture, layer: int) -> dict[str, list[float]]:
    acc_o, acc_z = state.full(f"L{layer}.attn_out"), state.full(f"L{layer}.attn_z")
    basis_o = principal_basis(acc_o)
    W_O, _ = arch.output_projection(layer)
    parts = variance_decomposition(acc_z, W_O.detach().to(torch.float64), basis_o.eigenvectors)
    return {"var_O": parts["var_O"].tolist(), "contrib_Z": parts["contrib_Z"].tolist(),
            "contrib_WO": parts["contrib_WO"].tolist(), "var_O_measured": basis_o.eigenvalues.tolist()}


def run_spectrum(cfg: SpectrumConfig, out: str | Path, progress: bool = True, command: str | None = None,
                 report: bool = True, distributed: bool = False) -> dict[str, Any]:
    """Run (or resume, or reuse) the spectrum job in `out`; returns the spectrum.json content.

    With `distributed` (a torchrun process group; see ``ranklens.distributed``) the accumulation is shared by the
    ranks and rank 0 does the rest alone (statistics, loss recovered, comparisons as one-process sub-runs, the
    report); the other ranks return an empty dict once their part is merged."""
    main = world()[0] == 0 or not distributed
    error, lock = None, None
    if main:
        try:
            lock = DirectoryLock(check_output_dir(out)).acquire()  # rank 0 holds the run directory
            out = prepare_run_dir(out, cfg, "spectrum")
        except RanklensError as err:
            error = str(err)
            if lock is not None:
                lock.release()
    if distributed:
        broadcast_error(error)  # also the barrier that keeps other ranks from writing into an unchecked directory
    elif error is not None:
        raise RanklensError(error)
    try:
        return _run(cfg, Path(out), progress, command, report, distributed, main)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: SpectrumConfig, out: Path, progress: bool, command: str | None, report: bool, distributed: bool,
         main: bool) -> dict[str, Any]:
    result_path = out / RESULT_NAME
    if result_path.exists():
        if not main:
            return {}
        result = read_json(result_path)
    else:
        result = _measure(cfg, out, progress, distributed)
        if result is None:
            return {}
        result["command"] = command
        atomic_write_json(result_path, result)
    if report:
        from ranklens.spectrum.report import build_spectrum_report

        build_spectrum_report(result, out)
    return result


def _measure(cfg: SpectrumConfig, out: Path, progress: bool, distributed: bool = False) -> dict[str, Any] | None:
    """spectrum.json's content; None on ranks other than 0 of a distributed run, once their part is merged."""
    from ranklens.data.collect import check_context_length

    timings: dict[str, float] = {}
    lm = load_model(cfg.model, cfg.dtype, rank_device(cfg.device) if distributed else cfg.device)
    check_context_length(lm.model, cfg.context_length)
    arch = lm.arch
    sites, decompose_layers = _sites(cfg, arch)
    split_sites = {s.name for s in (parse_sites(cfg.stability_sites, arch.n_layers) if cfg.stability_sites
                                    else sites)} if cfg.splits > 1 else set()
    loss_sites = parse_sites(cfg.loss_recovered, arch.n_layers) if cfg.loss_recovered else []
    missing = [s.name for s in loss_sites if s not in sites]
    if missing:
        raise RanklensError(f"--loss-recovered sites {missing} are not among --sites; expected a subset of them")

    start = time.monotonic()
    state = accumulate(lm, sites, split_sites, cfg, out / "state", progress, distributed)
    timings["accumulate"] = time.monotonic() - start
    if distributed and world()[0] != 0:
        return None

    start = time.monotonic()
    records = []
    for site in sites:
        acc = state.full(site.name)
        record = {"site": site.name, "layer": site.layer, "kind": site.kind, **spectrum_summary(acc)}
        if len(state.accs[site.name]) > 1:
            record["stability"] = stability_summary(state.accs[site.name])
        records.append(record)
    by_name = {r["site"]: r for r in records}
    for layer in decompose_layers:
        by_name[f"L{layer}.attn_out"]["wo_decomposition"] = _decomposition(state, arch, layer)
    timings["statistics"] = time.monotonic() - start

    if loss_sites:
        start = time.monotonic()
        loss_recovered(lm, arch, cfg, state, loss_sites, by_name, out / "state", progress)
        timings["loss_recovered"] = time.monotonic() - start

    result = {"format": "ranklens.spectrum/1", "model": cfg.model, "corpus": cfg.corpus, "family": arch.family,
              "n_layers": arch.n_layers, "d_model": arch.d_model, "n_tokens": state.tokens_done,
              "model_dtype": str(lm.dtype).removeprefix("torch."), "config": cfg.model_dump(mode="json"),
              "records": records, "timings": timings}
    if cfg.compare:
        start = time.monotonic()
        result["compare"] = _comparisons(cfg, out, progress)
        timings["compare"] = time.monotonic() - start
    return result


def _comparisons(cfg: SpectrumConfig, out: Path, progress: bool) -> list[dict[str, Any]]:
    """Figure 2 middle/right: the same sites (`compare_sites`) on other models or corpora, as sub-runs."""
    entries = []
    for item in cfg.compare.split(","):
        key, _, value = item.strip().partition("=")
        if key not in ("model", "corpus") or not value:
            raise RanklensError(f"--compare item {item!r}: expected model=NAME or corpus=NAME")
        update = {key: value, "sites": cfg.compare_sites, "tokens": cfg.compare_tokens, "loss_recovered": None,
                  "decompose": None, "compare": None, "splits": 1, "stability_sites": None}
        if key == "model":  # e.g. a BERT encoder with 512 positions beside a 1024-token context
            update["context_length"] = min(cfg.context_length, max_positions(value) or cfg.context_length)
        variant = cfg.model_copy(update=update)
        label = f"{key}={value}"
        sub = run_spectrum(variant, out / "compare" / label.replace("/", "_").replace("=", "-"), progress,
                           report=False)
        entries.append({"label": label, "model": variant.model, "corpus": variant.corpus,
                        "records": sub["records"]})
    return entries
