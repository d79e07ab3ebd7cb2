"""`ranklens train sae --sites PATTERN`: one SAE per site (and per seed, k or expansion), from one model forward
per batch.

Every member is an ordinary `train sae` run in DIR/<site>[-<variant>] whose config.yaml is the single-site command
that computes the same SAE (its site, seed, k and expansion, the group's data seed, and the group's store), so
`eval sae`, the dashboard and SAELens read it unchanged, and its numbers equal that command's. The group shares
what can be shared: the data (one multi-site store collected into DIR/activations, or one forward per chunk on the
fly; members of one site and data seed train on the very same batches), one held-out set for all sites, and the
training loop (``ranklens.train.group``: the members step in lockstep). DIR/group.json lists the members and their
headline metrics once all are finished; a killed group resumes every member from its own checkpoint.
"""

from __future__ import annotations

import itertools
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ranklens.data.sources import ACTIVATIONS_DIR, StoreTokens, StreamTokens, open_store
from ranklens.data.stream import StreamSource
from ranklens.eval.held_out import HeldOutSet
from ranklens.eval.metrics import upgrade_metrics
from ranklens.io import atomic_write_json, read_json
from ranklens.lm.load import LoadedModel, load_model
from ranklens.lm.sites import Site
from ranklens.rundir import check_output_dir, open_run_dir
from ranklens.train.config import SAETrainConfig
from ranklens.train.group import Member, train_group
from ranklens.train.sae_job import METRICS_NAME, SAERun, check_sizes, data_seed

GROUP_NAME = "group.json"


def members(cfg: SAETrainConfig, sites: list[Site]) -> list[tuple[str, Site, SAETrainConfig]]:
    """(directory name, site, the equivalent single-site config) of every member; a name carries only the axes
    that vary: -s<seed> with --seeds, -k<k> with --k-values, -x<expansion> with --expansion-values."""
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    ks = cfg.k_values or [cfg.k]
    expansions = cfg.expansion_values or [cfg.expansion]
    out = []
    for site, seed, k, expansion in itertools.product(sites, seeds, ks, expansions):
        name = site.name + (f"-s{seed}" if cfg.seeds > 1 else "") + (f"-k{k}" if cfg.k_values else "") + \
            (f"-x{expansion}" if cfg.expansion_values else "")
        single = cfg.model_copy(update={"site": site.name, "sites": None, "seeds": 1, "k_values": [],
                                        "expansion_values": [], "seed": seed, "data_seed": data_seed(cfg), "k": k,
                                        "expansion": expansion})
        out.append((name, site, single))
    return out


class _View:
    """One site of a multi-site stream, as the training data of that site's members (``head`` for their init)."""

    def __init__(self, stream, site: str, total_steps: int, held_out) -> None:
        self.stream, self.site, self.total_steps, self.held_out = stream, site, total_steps, held_out

    def head(self):
        return (batch[self.site] for batch in self.stream(0))


def _by_site(stream: StreamSource):
    """The stream's batches as {site: batch} (a stream of one site yields bare batches)."""
    if len(stream.sites) > 1:
        return stream
    (site,) = stream.sites
    return lambda start: ({site: batch} for batch in stream(start))


def train_sae_group(cfg: SAETrainConfig, out: str | Path, progress: bool = True, lm: LoadedModel | None = None,
                    ) -> dict[str, Any]:
    """Train (or resume, or reuse) every member of the group in `out`; returns {"members": {name: metrics}}."""
    check_output_dir(out)
    lm = lm or load_model(cfg.model, cfg.dtype, cfg.device)
    sites = lm.arch.parse(cfg.sites)
    planned = members(cfg, sites)
    for _, site, single in planned:
        check_sizes(single, lm.arch.site_dim(site))  # bad sizes fail before anything is written
    with open_run_dir(out, cfg, "train-sae-group") as group_dir, ExitStack() as locks:
        seed = data_seed(cfg)
        if cfg.source == "store":
            store = open_store(lm, sites, store=cfg.store, collect_dir=group_dir / ACTIVATIONS_DIR,
                               corpus=cfg.corpus, seed=seed, context_length=cfg.context_length, tokens=cfg.tokens,
                               device=cfg.device, dtype=cfg.dtype, progress=progress)
            store_path = str(store.directory)
            sources = {s.name: StoreTokens(store, s, batch_size=cfg.batch_size,
                                           buffer_tokens=cfg.shuffle_buffer_tokens, seed=seed, tokens=cfg.tokens)
                       for s in sites}
            held_text = store.held_out()

            def batches(start: int):
                readers = {name: source(start) for name, source in sources.items()}
                while True:
                    yield {name: next(reader) for name, reader in readers.items()}
        else:
            store_path = None
            first = StreamTokens(lm, sites[0], cfg.corpus, seed=seed, context_length=cfg.context_length,
                                 batch_size=cfg.batch_size, tokens=cfg.tokens, chunk_tokens=cfg.stream_chunk_tokens)
            stream = _by_site(StreamSource(lm, [s.name for s in sites], cfg.corpus, seed=seed,
                                           context_length=cfg.context_length, batch_size=cfg.batch_size,
                                           chunk_tokens=cfg.stream_chunk_tokens))
            held_text = first.held_out
            sources = {s.name: _View(stream, s.name, first.total_steps, held_text) for s in sites}
            batches = stream
        held_out = HeldOutSet(lm, [s.name for s in sites], held_text, cfg.eval_tokens, cfg.lm_eval_tokens,
                              progress=progress)
        results: dict[str, Any] = {}
        runs: dict[str, SAERun] = {}
        for name, site, single in planned:
            single = single.model_copy(update={"store": store_path})
            member_dir = group_dir / name
            if (member_dir / METRICS_NAME).exists():
                results[name] = upgrade_metrics(read_json(member_dir / METRICS_NAME))
                continue
            run_dir = locks.enter_context(open_run_dir(member_dir, single, "train-sae"))
            runs[name] = SAERun.build(single, run_dir, lm, site, sources[site.name], held_out, progress)
        if runs:
            train_group([Member(r.trainer, r.site.name, r.curve_point, r.curve_steps) for r in runs.values()],
                        batches)
            results.update({name: run.finish() for name, run in runs.items()})
        summary = {name: {"dir": name, "site": next(s.name for n, s, _ in planned if n == name),
                          "fvu": m["fvu"], "l0": m["l0"], "train_dead": m["train_dead"],
                          "dead_window_tokens": m["dead_window_tokens"]} for name, m in results.items()}
        atomic_write_json(group_dir / GROUP_NAME, {"members": dict(sorted(summary.items()))})
        return {"members": {name: results[name] for name, _, _ in planned}}
