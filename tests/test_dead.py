"""Dead-feature tracking (paper footnote 2): firing windows, evaluation counts, state, window rule."""

from __future__ import annotations

import io

import pytest
import torch

from ranklens.errors import RanklensError
from ranklens.train.dead import PAPER_WINDOW_TOKENS, FiringTracker, dead_window, evaluation_dead


def test_update_sequence_and_windows():
    t = FiringTracker(6)
    assert not t.dead_mask(1).any()  # a new feature is not dead before a window has passed
    t.update(torch.tensor([[0, 1], [1, 2]]), n_tokens=100)  # top-k shaped, with a repeat
    assert t.tokens_since_fired.tolist() == [0, 0, 0, 100, 100, 100]
    t.update(torch.tensor([3]), n_tokens=50)
    assert t.tokens_since_fired.tolist() == [50, 50, 50, 0, 150, 150]
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 0] = True
    t.update(mask, n_tokens=50)  # a bool mask [tokens, n_features]
    assert t.tokens_since_fired.tolist() == [0, 100, 100, 50, 200, 200]
    t.update(torch.tensor([], dtype=torch.int64), n_tokens=0)
    assert t.tokens_since_fired.tolist() == [0, 100, 100, 50, 200, 200]
    assert t.tokens_seen == 200
    assert t.dead_mask(200).tolist() == [False, False, False, False, True, True]  # never fired over 200 tokens
    assert t.dead_mask(100).tolist() == [False, True, True, False, True, True]
    assert t.n_dead(201) == 0


def test_fire_counts_for_evaluation():
    t = FiringTracker(5)
    t.update_counts(torch.tensor([[0, 1], [1, 3]]))
    t.update_counts(torch.tensor([[1, 4]]), values=torch.tensor([[2.0, 0.0]]))  # a zero value is not a firing
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 0] = True
    t.update_counts(mask)
    assert t.fire_counts.tolist() == [4, 3, 0, 1, 0]
    assert evaluation_dead(t.fire_counts) == (2, 0.4)
    assert t.tokens_since_fired.tolist() == [0] * 5  # evaluation counts leave the training window alone
    t.reset_counts()
    assert evaluation_dead(t.fire_counts) == (5, 1.0)


def test_state_round_trip():
    t = FiringTracker(4)
    t.update(torch.tensor([1]), 30)
    t.update_counts(torch.tensor([1, 1, 2]))
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    u = FiringTracker(4)
    u.load_state_dict(torch.load(buf))
    for tracker in (t, u):
        tracker.update(torch.tensor([2]), 10)
    assert torch.equal(u.tokens_since_fired, t.tokens_since_fired)
    assert torch.equal(u.fire_counts, t.fire_counts)
    assert u.tokens_seen == t.tokens_seen == 40
    with pytest.raises(RanklensError, match=r"tokens_since_fired of shape \(4,\): expected \[5\]"):
        FiringTracker(5).load_state_dict(t.state_dict())


def test_dead_window_rule():
    assert dead_window(800_000_000) == PAPER_WINDOW_TOKENS == 10_000_000  # the paper's runs (App. E.1)
    assert dead_window(40_000_000) == 10_000_000
    assert dead_window(39_999_999) == 9_999_999
    assert dead_window(12_000_000) == 3_000_000
    assert dead_window(1_000) == 250
    assert dead_window(3) == 1
    assert dead_window(100, paper_window=10) == 10
