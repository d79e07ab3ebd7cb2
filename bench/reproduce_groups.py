"""Reproduce's SAE steps of the quick preset (experiments 3, 4, 5, 6), every cell alone (as before grouping) against
the cells grouped (``Context(group=True)``), in one process from one store, the arms' order alternating per step;
times each step and checks that both give the same results. The results file is rewritten after every step.

Usage: PYTHONPATH=src HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_groups.py WORKDIR
       (writes WORKDIR/ab.json; copy it to bench/results/reproduce_groups.json)
"""

import json
import os
import sys
import time
from pathlib import Path

from ranklens.reproduce.context import Context
from ranklens.reproduce.experiments import asi, controls, scaling
from ranklens.reproduce.plan import ModelShape, Plan
from ranklens.reproduce.presets import ReproduceConfig

cfg = ReproduceConfig.load(preset="quick")
shape = ModelShape.of(cfg.model)
root = Path(sys.argv[1])
plans = {arm: Plan(cfg, root / arm, shape) for arm in ("alone", "grouped")}
ctx = {"alone": Context(plans["alone"], progress=False, group=False),
       "grouped": Context(plans["grouped"], progress=False, group=True)}
t = time.perf_counter()
ctx["alone"].store()
collect_s = time.perf_counter() - t
plans["grouped"].store_dir.parent.mkdir(parents=True, exist_ok=True)
if not plans["grouped"].store_dir.exists():
    os.symlink(plans["alone"].store_dir, plans["grouped"].store_dir)


def dead_sweep(arm):
    plan = plans[arm]
    return ctx[arm].train_all([plan.cell("TopK", site=s) for s in plan.sweep_sites])


steps = {"dead_vs_rank": dead_sweep}
for module in (asi, controls, scaling):
    steps[module.NAME] = lambda arm, m=module: m.step(plans[arm]).run(ctx[arm])
out = {"collect_seconds": round(collect_s, 1), "steps": {}}
for i, (name, run) in enumerate(steps.items()):
    seconds, results = {}, {}
    for arm in (("alone", "grouped") if i % 2 == 0 else ("grouped", "alone")):
        t = time.perf_counter()
        results[arm] = run(arm)
        seconds[arm] = round(time.perf_counter() - t, 1)
    res = {"alone_seconds": seconds["alone"], "grouped_seconds": seconds["grouped"],
           "results_equal": results["alone"] == results["grouped"]}
    out["steps"][name] = res
    print(name, res, flush=True)
    (root / "ab.json").write_text(json.dumps(out, indent=1))
a = sum(r["alone_seconds"] for r in out["steps"].values())
g = sum(r["grouped_seconds"] for r in out["steps"].values())
out["total"] = {"alone_seconds": round(a, 1), "grouped_seconds": round(g, 1), "speedup": round(a / g, 3)}
print(out["total"], flush=True)
(root / "ab.json").write_text(json.dumps(out, indent=1))
