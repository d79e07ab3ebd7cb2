"""What the steps of a reproduce run share: the loaded model, the SAE activation store, held-out evaluation sets, and
the SAE runs (each a `ranklens train sae` run directory under DIR/sae, reused when finished).

A step's unfinished cells that read the same data (``Plan.groups``: one seed and token budget, any sites, methods,
sizes, k or learning rates) train together: one reader of the store per site feeds every member of that site the
very same batches, the members step in lockstep (``ranklens.train.group``), and each member is still its ordinary
run directory, resumable from its own checkpoint, with the metrics its single `train sae` command computes.

Everything is created on first use, so a rerun whose steps are all cached loads nothing.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import ExitStack
from typing import Any

from ranklens.data.collect import collect
from ranklens.data.sources import StoreTokens
from ranklens.data.store import ActivationStore
from ranklens.eval.held_out import HeldOutSet
from ranklens.lm.load import LoadedModel, load_model
from ranklens.lm.sites import Site
from ranklens.reproduce.plan import Cell, Plan
from ranklens.rundir import open_run_dir
from ranklens.train.group import Member, train_group
from ranklens.train.sae_job import METRICS_NAME, SAERun, check_sizes, data_seed, train_sae
from ranklens.train.trainer import remove_checkpoints

_HELD_OUT_LAYERS = 2  # held-out sets kept in memory (one per layer; the sweep visits layers in order)


class Context:
    def __init__(self, plan: Plan, progress: bool = True, group: bool = True) -> None:
        self.plan = plan
        self.progress = progress
        self.group = group  # False: every cell trains alone (the equality test's reference)
        self.records: dict[str, dict[str, Any]] = {}  # finished steps, filled in by run_steps
        self._lm: LoadedModel | None = None
        self._store: ActivationStore | None = None
        self._lorsa_stores: dict[int, ActivationStore] = {}
        self._held_out: OrderedDict[int, HeldOutSet] = OrderedDict()

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            c = self.plan.cfg
            self._lm = load_model(c.model, c.dtype, c.device)
        return self._lm

    def store(self) -> ActivationStore:
        """The SAE activation store (collected, resumed or reused)."""
        if self._store is None:
            self._store = collect(self.plan.collect_config(), self.plan.store_dir, progress=self.progress,
                                  lm=self.lm)
        return self._store

    def lorsa_store(self, context_length: int) -> ActivationStore:
        """The store Lorsa runs at the middle layer read at `context_length`: the run's store, or its own."""
        if context_length == self.plan.cfg.context_length:
            return self.store()
        if context_length not in self._lorsa_stores:
            self._lorsa_stores[context_length] = collect(self.plan.collect_config(context_length),
                                                         self.plan.lorsa_store_dir(context_length),
                                                         progress=self.progress, lm=self.lm)
        return self._lorsa_stores[context_length]

    def held_out(self, site: str) -> HeldOutSet:
        """The held-out set of the store's sites at `site`'s layer (one forward pass serves all of them)."""
        layer = Site.parse(site).layer
        if layer not in self._held_out:
            plan, c = self.plan, self.plan.cfg
            sites = [s for s in plan.store_sites if Site.parse(s).layer == layer]
            source = self.store().held_out()
            self._held_out[layer] = HeldOutSet(self.lm, sites, source, c.eval_tokens, c.lm_eval_tokens)
            while len(self._held_out) > _HELD_OUT_LAYERS:
                self._held_out.popitem(last=False)
        self._held_out.move_to_end(layer)
        return self._held_out[layer]

    def train(self, cell: Cell) -> dict[str, Any]:
        """The metrics of one SAE cell, trained now or reused; the checkpoint of a finished run is removed (it only
        serves resuming)."""
        out = self.plan.sae_dir(cell)
        cfg = self.plan.sae_config(cell)
        if (out / METRICS_NAME).exists():
            return train_sae(cfg, out, progress=False)
        self.store()
        metrics = train_sae(cfg, out, progress=self.progress, lm=self.lm, held_out=self.held_out(cell.site))
        remove_checkpoints(out)
        return metrics

    def train_group(self, cells: list[Cell]) -> None:
        """Train the unfinished `cells` (one ``Plan.group_key``) together; each member's checkpoint is removed once
        all are finished."""
        plan, lm, store = self.plan, self.lm, self.store()
        sources: dict[Hashable, StoreTokens] = {}
        runs: list[tuple[SAERun, Hashable]] = []
        with ExitStack() as locks:
            for cell in cells:
                cfg = plan.sae_config(cell)
                site = lm.arch.site(cfg.site)
                check_sizes(cfg, lm.arch.site_dim(site))
                run_dir = locks.enter_context(open_run_dir(plan.sae_dir(cell), cfg, "train-sae"))
                # What fixes a run's batches (as `train_sae` reads them from the store): equal keys, equal batches.
                key = (site.name, data_seed(cfg), cfg.batch_size, cfg.shuffle_buffer_tokens, cfg.tokens)
                if key not in sources:
                    sources[key] = StoreTokens(store, site, batch_size=cfg.batch_size,
                                               buffer_tokens=cfg.shuffle_buffer_tokens, seed=data_seed(cfg),
                                               tokens=cfg.tokens)
                runs.append((SAERun.build(cfg, run_dir, lm, site, sources[key], self.held_out(cell.site),
                                          self.progress), key))

            def batches(start: int) -> Iterator[dict[Hashable, Any]]:
                readers = {key: source(start) for key, source in sources.items()}
                while True:
                    yield {key: next(reader) for key, reader in readers.items()}

            train_group([Member(r.trainer, key, r.curve_point, r.curve_steps) for r, key in runs], batches)
            for run, _ in runs:
                run.finish()
        for cell in cells:
            remove_checkpoints(plan.sae_dir(cell))

    def train_all(self, cells: list[Cell]) -> dict[str, dict[str, Any]]:
        """Metrics per cell name, in order; shared cells run once, cells that read the same data as a group."""
        unique = list(dict.fromkeys(cells))
        pending = [c for c in unique if not (self.plan.sae_dir(c) / METRICS_NAME).exists()]
        if self.progress and len(pending) < len(unique):
            print(f"  SAE runs: {len(unique) - len(pending)} of {len(unique)} finished (cached)", file=sys.stderr,
                  flush=True)
        groups = self.plan.groups(pending) if self.group else [[c] for c in pending]
        done = len(unique) - len(pending)
        for group in groups:
            if self.progress:
                what = group[0].name if len(group) == 1 else f"a group of {len(group)} on one pass of the data"
                span = f"{done + 1}" if len(group) == 1 else f"{done + 1}-{done + len(group)}"
                print(f"  SAE {span}/{len(unique)} {what}", file=sys.stderr, flush=True)
            if len(group) == 1:
                self.train(group[0])
            else:
                self.train_group(group)
            done += len(group)
        return {cell.name: self.train(cell) for cell in unique}
