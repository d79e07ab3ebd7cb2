"""Reproduce trains the cells that read the same data as one group (one pass over the store, members in lockstep);
every member equals the cell trained alone, bit for bit: its metrics, its held-out curve and its SAE's weights."""

import json

import pytest
from safetensors.torch import load_file

from ranklens.reproduce import context as context_module
from ranklens.reproduce.context import Context
from ranklens.reproduce.plan import ModelShape, Plan
from ranklens.reproduce.presets import ReproduceConfig


@pytest.fixture(scope="module")
def cfg(tiny_dir):
    return ReproduceConfig(model=str(tiny_dir / "model"), corpus=str(tiny_dir / "corpus"), context_length=64,
                           dtype="float32", seeds=2, store_tokens=2048, sae_tokens=1024, batch_size=256,
                           warmup_steps=2, expansion=2, k=4, d_init=8, init_tokens=1024, eval_tokens=500,
                           lm_eval_tokens=300, sweep_layers=2, curve_tokens=[512], aux_k=8,
                           experiments=["dead_vs_rank", "asi", "controls"])


def _cells(plan: Plan):
    """Every kind of difference a group holds: sites of two layers, methods, k, size, learning rate, two seeds."""
    cells = [plan.cell("TopK", site=site) for site in plan.sweep_sites]
    for method in ("TopK", "AuxK", "ASI", "ASI + SparseAdam", "random subspace"):
        cells += plan.cells(method)
    cells += plan.cells("TopK", k=2) + plan.cells("ASI", expansion=4) + plan.cells("ASI", lr=3e-3)
    cells += plan.cells("TopK", site=plan.resid_site)
    return cells


def _files(run_dir):
    weights = {name: t for f in sorted((run_dir / "sae").glob("*.safetensors")) for name, t in load_file(f).items()}
    return (json.loads((run_dir / "metrics.json").read_text()), (run_dir / "curve.jsonl").read_text(),
            (run_dir / "config.yaml").read_text(), weights)


def test_group_members_equal_single_runs(cfg, tmp_path, monkeypatch):
    shape = ModelShape.of(cfg.model)
    plan = Plan(cfg, tmp_path / "grouped", shape)
    alone = Plan(cfg, tmp_path / "alone", shape)
    cells = _cells(plan)
    assert len(plan.groups(cells)) == 2  # one per seed (the sizes fit the memory budget)
    sizes = []
    original = context_module.train_group

    def spy(members, batches):
        sizes.append(len(members))
        return original(members, batches)

    monkeypatch.setattr(context_module, "train_group", spy)
    grouped = Context(plan, progress=False).train_all(cells)
    assert sorted(sizes) == sorted(len(g) for g in plan.groups(cells)) and sum(sizes) == len(set(cells))
    single = Context(alone, progress=False, group=False).train_all(cells)
    assert len(sizes) == 2  # the reference trained every cell alone
    store_a, store_b = str(plan.store_dir), str(alone.store_dir)
    for cell in dict.fromkeys(cells):
        a, b = _files(plan.sae_dir(cell)), _files(alone.sae_dir(cell))
        assert grouped[cell.name] == single[cell.name] == a[0] == b[0], cell.name
        assert a[1] == b[1] and a[1], cell.name
        assert a[2] == b[2].replace(store_b, store_a), cell.name
        assert a[3].keys() == b[3].keys() and all(a[3][n].equal(b[3][n]) for n in a[3]), cell.name
        assert not (plan.sae_dir(cell) / "checkpoint.safetensors").exists()


def test_groups_split_by_seed_and_budget(cfg, tmp_path):
    plan = Plan(cfg, tmp_path, ModelShape.of(cfg.model))
    cells = _cells(plan)
    groups = plan.groups(cells + cells[:3])  # a repeated cell counts once
    assert {len({c.seed for c in g}) for g in groups} == {1} and sum(map(len, groups)) == len(set(cells))
    budget = 2 * max(plan.group_bytes([c]) for c in cells)
    small = plan.groups(cells, budget=budget)
    assert all(plan.group_bytes(g) <= budget or len(g) == 1 for g in small) and len(small) > 2
    assert [c for g in small for c in g] == [c for g in groups for c in g]  # the same order
