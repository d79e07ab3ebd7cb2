"""Dead-feature tracking (paper footnote 2: "Following Bricken et al. (2023b), we define a feature as dead if it never
activates over 10 million tokens in this paper"; Section 5.1 relates dead features to the low-rank structure).

A feature is *active* on a token when its value after the activation function is nonzero. Two counters:

* ``tokens_since_fired`` [n_features] for training: tokens seen since the feature was last active in a batch. A feature
  is dead for a window W when ``tokens_since_fired >= W``. It starts at 0, so a new feature is not dead until a whole
  window has passed without it firing; the granularity is the batch (a feature active anywhere in a batch is reset).
  This mask drives AuxK (``ranklens.train.auxk``) and the training-time dead count.
* ``fire_counts`` [n_features] for evaluation passes: how many tokens each feature was active on; a feature with count 0
  over an evaluation pass of N tokens is dead over N tokens (``evaluation_dead``).

The window must always be reported with the count (a dead count means nothing without it); ``dead_window`` gives the
window for a run of a given length.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ranklens.errors import RanklensError

__all__ = ["PAPER_WINDOW_TOKENS", "FiringTracker", "dead_window", "evaluation_dead"]

PAPER_WINDOW_TOKENS = 10_000_000  # footnote 2


def _features(active: Tensor, n_features: int) -> Tensor:
    """Indices of the features named by ``active``: int indices of any shape, or a bool mask [..., n_features]. The
    trainer's objectives produce these; nothing is checked here (this runs every step)."""
    if active.dtype == torch.bool:
        return active.reshape(-1, n_features).any(dim=0).nonzero().squeeze(1)
    return active.reshape(-1).to(torch.int64)


class FiringTracker:
    """Per-feature firing statistics for dead-feature detection (paper footnote 2). Checkpointable."""

    def __init__(self, n_features: int, device: torch.device | str | None = None) -> None:
        self.n_features = n_features
        device = torch.device("cpu") if device is None else torch.device(device)
        self.tokens_since_fired = torch.zeros(n_features, dtype=torch.int64, device=device)
        self.fire_counts = torch.zeros(n_features, dtype=torch.int64, device=device)
        self.tokens_seen = 0  # tokens passed to ``update``, for reports ("dead over the last W of N tokens")

    @property
    def device(self) -> torch.device:
        return self.tokens_since_fired.device

    def update(self, active_features: Tensor, n_tokens: int) -> None:
        """A batch of ``n_tokens`` tokens went by, in which ``active_features`` were active (int indices of any shape,
        duplicates allowed, e.g. top-k indices [tokens, k]; or a bool mask [..., n_features]). Every feature's counter
        grows by ``n_tokens``, then the active ones are reset to 0."""
        idx = _features(active_features, self.n_features).to(self.device)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.index_fill_(0, idx, 0)
        self.tokens_seen += n_tokens

    def update_counts(self, indices: Tensor, values: Tensor | None = None) -> None:
        """Add one activation per entry of ``indices`` (int, any shape, e.g. top-k [tokens, k]) to ``fire_counts``;
        with ``values`` (same shape), entries whose value is 0 are not activations and are skipped. A bool mask
        [..., n_features] counts its True entries per feature."""
        if indices.dtype == torch.bool:
            self.fire_counts += indices.reshape(-1, self.n_features).sum(dim=0).to(self.device)
            return
        if values is not None:
            indices = indices[values != 0]
        idx = _features(indices, self.n_features).to(self.device)
        self.fire_counts += torch.bincount(idx, minlength=self.n_features)

    def dead_mask(self, window_tokens: int) -> Tensor:
        """bool [n_features]: features not active during the last ``window_tokens`` tokens."""
        return self.tokens_since_fired >= window_tokens

    def n_dead(self, window_tokens: int) -> int:
        return int(self.dead_mask(window_tokens).sum())

    def reset_counts(self) -> None:
        """Start a new evaluation pass (``fire_counts`` only; the training window is untouched)."""
        self.fire_counts.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "fire_counts": self.fire_counts.clone(),
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"tokens_since_fired", "fire_counts", "tokens_seen"} - set(state)
        if missing:
            raise RanklensError(f"a FiringTracker state without {sorted(missing)}: expected a FiringTracker.state_dict()")
        for key in ("tokens_since_fired", "fire_counts"):
            value = state[key]
            if not isinstance(value, Tensor) or tuple(value.shape) != (self.n_features,):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise RanklensError(f"a loaded {key} of shape {got}: expected [{self.n_features}]")
        self.tokens_since_fired = state["tokens_since_fired"].to(device=self.device, dtype=torch.int64).clone()
        self.fire_counts = state["fire_counts"].to(device=self.device, dtype=torch.int64).clone()
        self.tokens_seen = int(state["tokens_seen"])


def dead_window(total_tokens: int, paper_window: int = PAPER_WINDOW_TOKENS) -> int:
    """The dead-feature window for a run of ``total_tokens`` training tokens: min(paper_window, total_tokens // 4),
    at least 1.

    Runs of 40M tokens or more get the paper's 10M (footnote 2; the paper trains on 800M tokens, App. E.1). Shorter runs
    get a quarter of the run: a window close to the run's length would flag features only at its very end, so AuxK
    (which acts on the dead features) would have no time to revive them and the count would describe only the last
    stretch; a quarter leaves three quarters of the run after the first possible flag and is still long enough that a
    feature missing it is rare rather than merely unlucky. This gives less than 10M for runs between 10M and 40M
    tokens too, for the same reason (a 12M-token run with a 10M window could flag features only in its last 2M).
    """
    return max(1, min(paper_window, total_tokens // 4))


def evaluation_dead(fire_counts: Tensor) -> tuple[int, float]:
    """(number, fraction) of features that never fired over an evaluation pass (``FiringTracker.fire_counts``)."""
    n_dead = int((fire_counts == 0).sum())
    return n_dead, n_dead / fire_counts.numel()
