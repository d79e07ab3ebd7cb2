"""What the steps of a reproduce run share: the loaded model, the SAE activation store, held-out evaluation sets, and
the SAE runs (each a `ranklens train sae` run directory under DIR/sae, reused when finished).

Everything is created on first use, so a rerun whose steps are all cached loads nothing.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

from ranklens.data.collect import collect
from ranklens.data.store import ActivationStore
from ranklens.eval.held_out import HeldOutSet
from ranklens.lm.load import LoadedModel, load_model
from ranklens.lm.sites import Site
from ranklens.reproduce.plan import Cell, Plan
from ranklens.train.sae_job import METRICS_NAME, train_sae
from ranklens.train.trainer import remove_checkpoints

_HELD_OUT_LAYERS = 2  # held-out sets kept in memory (one per layer; the sweep visits layers in order)


class Context:
    def __init__(self, plan: Plan, progress: bool = True) -> None:
        self.plan = plan
        self.progress = progress
        self.records: dict[str, dict[str, Any]] = {}  # finished steps, filled in by run_steps
        self._lm: LoadedModel | None = None
        self._store: ActivationStore | None = None
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

    def train_all(self, cells: list[Cell]) -> dict[str, dict[str, Any]]:
        """Metrics per cell name, in order; shared cells run once."""
        unique = list(dict.fromkeys(cells))
        results = {}
        for i, cell in enumerate(unique, 1):
            if self.progress:
                cached = (self.plan.sae_dir(cell) / METRICS_NAME).exists()
                print(f"  SAE {i}/{len(unique)} {cell.name}" + (" (cached)" if cached else ""), file=sys.stderr,
                      flush=True)
            results[cell.name] = self.train(cell)
        return results
