"""Reconstruction metrics over held-out tokens, accumulated batch by batch, and the one vocabulary of metric keys
(definitions in the README's Definitions).

- `fvu`: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all evaluated tokens (a ratio of sums, not a mean of
  per-token ratios), with mean(x) the mean over the evaluated tokens. `nmse` is the same number under its old name,
  kept for one format version.
- `nmse_uncentered`: sum ||x - x_hat||^2 / sum ||x||^2, for comparison with libraries that use it.
- `explained_variance` = 1 - fvu.
- `l0`: mean number of active features per token.
- `eval_dead` / `eval_dead_fraction`: features never active over the `eval_tokens` evaluation tokens.
- `train_dead` / `train_dead_fraction`: features not active in the last `dead_window_tokens` training tokens (set by
  the training jobs).

SAEs and Lorsa use the same keys (a Lorsa head is a feature). ``upgrade_metrics`` reads the keys of format 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ReconstructionMetrics:
    n_features: int
    n_tokens: int = 0
    sum_sq_error: float = 0.0
    sum_sq: float = 0.0
    sum_x: torch.Tensor | None = None  # float64 [d]
    sum_l0: float = 0.0
    fire_counts: torch.Tensor = field(default=None)  # int64 [n_features]

    def __post_init__(self) -> None:
        if self.fire_counts is None:
            self.fire_counts = torch.zeros(self.n_features, dtype=torch.int64)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, active: torch.Tensor) -> None:
        """x, x_hat [n, d]; active: int64 indices of the features that fired (repeats count each firing)."""
        x64, xh64 = x.detach().double(), x_hat.detach().double()
        self.n_tokens += x.shape[0]
        self.sum_sq_error += float((x64 - xh64).pow(2).sum())
        self.sum_sq += float(x64.pow(2).sum())
        batch_sum = x64.sum(0)
        self.sum_x = batch_sum if self.sum_x is None else self.sum_x + batch_sum
        flat = active.reshape(-1).cpu()
        self.sum_l0 += float(flat.numel())
        self.fire_counts += torch.bincount(flat, minlength=self.n_features)

    def result(self) -> dict[str, float | int]:
        n = max(self.n_tokens, 1)
        # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2, in float64
        centered = self.sum_sq - float(self.sum_x.pow(2).sum()) / n if self.sum_x is not None else 0.0
        nmse = self.sum_sq_error / centered if centered > 0 else float("nan")  # the FVU
        dead = int((self.fire_counts == 0).sum())
        return {"fvu": nmse, "nmse": nmse,
                "nmse_uncentered": self.sum_sq_error / self.sum_sq if self.sum_sq > 0 else float("nan"),
                "explained_variance": 1.0 - nmse, "l0": self.sum_l0 / n, "eval_tokens": self.n_tokens,
                "eval_dead": dead, "eval_dead_fraction": dead / self.n_features}


METRICS_FORMAT = 2  # 1: nmse, dead_features/dead_fraction (training window), eval_dead_features; Lorsa dead_heads


def upgrade_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """A metrics record of format 1 in today's keys (a record of format 2 is returned unchanged)."""
    if m.get("metrics_format", 1) >= METRICS_FORMAT:
        return m
    out = dict(m)
    lorsa = "n_heads" in m
    renames = {"eval_dead_features": "eval_dead"}
    if lorsa:  # Lorsa's format 1: dead_heads/dead_fraction over the evaluation, train_dead_heads over training
        renames.update({"dead_heads": "eval_dead", "dead_fraction": "eval_dead_fraction",
                        "train_dead_heads": "train_dead"})
    else:
        renames.update({"dead_features": "train_dead", "dead_fraction": "train_dead_fraction"})
    for old, new in renames.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    if "fvu" not in out and "nmse" in out:
        out["fvu"] = out["nmse"]
    out["metrics_format"] = METRICS_FORMAT
    return out
