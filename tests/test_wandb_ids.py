"""Weights & Biases run ids: unique per run directory, kept across a resume.

wandb's server is unreachable here (no network), so a stand-in `wandb` module records what the Trainer passes to
`wandb.init` and `log`. It stands in only for the remote logger; the Trainer, its training and its run directories
are the real ones."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from ranklens.dictionaries.sae import SAEConfig, SparseAutoencoder
from ranklens.train.sae_objective import SAEObjective
from ranklens.train.trainer import WANDB_ID_NAME, Trainer, TrainSettings


class _Run:
    def __init__(self, calls: list, kwargs: dict) -> None:
        self.kwargs, self.logged = kwargs, []
        calls.append(self)

    def log(self, row, step):
        self.logged.append(step)


@pytest.fixture()
def wandb_calls(monkeypatch):
    calls: list[_Run] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: _Run(calls, kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return calls


def _train(run_dir, steps: int = 10) -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_features=16, activation="topk", k=2))
    settings = TrainSettings(total_steps=steps, lr=1e-3, warmup_steps=0, k=2, dead_window_tokens=64,
                             checkpoint_every=5, log_every=5, wandb_project="ranklens-test")

    def batches(start: int):
        step = start
        while True:
            yield torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            step += 1

    Trainer(SAEObjective(sae), settings, run_dir, progress=False).train(batches)


def test_same_name_in_two_places_gets_two_wandb_runs(tmp_path, wandb_calls):
    _train(tmp_path / "a" / "sae")
    _train(tmp_path / "b" / "sae")
    first, second = (run.kwargs for run in wandb_calls)
    assert first["name"] == second["name"] == "sae" and first["project"] == "ranklens-test"
    assert first["id"] != second["id"] and first["id"].startswith("sae-") and second["id"].startswith("sae-")
    assert all(run.logged for run in wandb_calls)


def test_a_resumed_run_logs_into_its_own_wandb_run(tmp_path, wandb_calls):
    _train(tmp_path / "sae", steps=5)
    _train(tmp_path / "sae", steps=10)  # the same run directory again, as a resume runs it
    first, second = (run.kwargs for run in wandb_calls)
    assert first["id"] == second["id"] == (tmp_path / "sae" / WANDB_ID_NAME).read_text().strip()
    assert second["resume"] == "allow"
