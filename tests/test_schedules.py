"""Learning-rate, K-annealing and sparsity warm-up schedules (paper App. E.1, L.2, E.4)."""

from __future__ import annotations

import math

import pytest
import torch

from ranklens.errors import RanklensError
from ranklens.train.schedules import k_schedule, l1_warmup, lr_lambda, lr_multiplier


def test_lr_three_phases_at_exact_boundaries():
    T = 10_000  # 500 warm-up steps, decay over the final 2,000 steps (steps 8000..9999)
    assert lr_multiplier(0, T) == 1 / 500
    assert lr_multiplier(1, T) == 2 / 500
    assert lr_multiplier(498, T) == 499 / 500
    assert lr_multiplier(499, T) == 1.0
    assert lr_multiplier(500, T) == 1.0
    assert lr_multiplier(7999, T) == 1.0
    assert math.isclose(lr_multiplier(8000, T), 1 - 0.99 / 2000)
    assert math.isclose(lr_multiplier(8999, T), 0.01 + 0.99 * 1000 / 2000)
    assert lr_multiplier(9999, T) == 0.01
    assert lr_multiplier(10_000, T) == 0.01
    assert lr_multiplier(123_456, T) == 0.01


def test_lr_monotone_phases_and_bounds():
    T = 3_000
    values = [lr_multiplier(s, T) for s in range(T + 5)]
    warm, flat, decay = values[:500], values[500:2400], values[2400:]
    assert all(a < b for a, b in zip(warm, warm[1:], strict=False))
    assert set(flat) == {1.0}
    assert all(a > b for a, b in zip(decay[:600], decay[1:600], strict=False))
    assert all(0.0 < v <= 1.0 for v in values) and min(values[500:]) == 0.01


@pytest.mark.parametrize("T", [1, 2, 3, 10, 100, 499, 500, 624, 625, 626])
def test_lr_short_runs_scale_the_warmup_down(T):
    values = [lr_multiplier(s, T) for s in range(T)]
    assert all(0.0 < v <= 1.0 for v in values)
    decay_steps = round(0.2 * T)
    warm = min(500, T - decay_steps)
    assert values[0] == 1 / warm
    assert values[warm - 1] == 1.0  # the warm-up always completes before the decay starts
    if decay_steps:
        assert values[-1] == 0.01
    # rises, then (possibly after a plateau) falls: never rises after it started falling
    peak = values.index(1.0)
    assert all(a < b for a, b in zip(values[: peak + 1], values[1 : peak + 1], strict=False))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1 :], strict=False))


def test_lr_edge_settings():
    assert lr_multiplier(0, 100, warmup_steps=0) == 1.0
    assert lr_multiplier(0, 100, decay_fraction=1.0) == pytest.approx(1 - 0.99 / 100)  # pure decay, no warm-up
    assert lr_multiplier(99, 100, decay_fraction=1.0) == 0.01
    assert lr_multiplier(99, 100, final_fraction=0.0) == 0.0
    assert lr_multiplier(50, 100, decay_fraction=0.0, warmup_steps=10) == 1.0


def test_lr_lambda_drives_torch_lambdalr():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(50, warmup_steps=5))
    seen = []
    for _ in range(50):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-4 * lr_multiplier(s, 50, warmup_steps=5) for s in range(50)], rel=1e-12)


def test_lr_bad_input():
    with pytest.raises(RanklensError, match="step=-1"):
        lr_multiplier(-1, 10)
    with pytest.raises(RanklensError, match="total_steps=0"):
        lr_multiplier(0, 0)
    with pytest.raises(RanklensError, match="decay_fraction=1.5"):
        lr_multiplier(0, 10, decay_fraction=1.5)
    with pytest.raises(RanklensError, match="final_fraction=-0.1"):
        lr_lambda(10, final_fraction=-0.1)


def test_k_schedule_endpoints_and_monotonicity():
    T, k_final, k_initial = 1_000, 50, 1_000
    ks = [k_schedule(s, T, k_final, k_initial, anneal_fraction=0.1) for s in range(T)]
    assert ks[0] == k_initial
    assert ks[99] > k_final and ks[100] == k_final  # anneal over steps 0..99, K_final from step 100 on
    assert ks[50] == 50 + math.ceil(950 * 50 / 100)
    assert all(a >= b for a, b in zip(ks, ks[1:], strict=False))
    assert all(isinstance(k, int) and k >= k_final for k in ks)
    assert set(ks[100:]) == {k_final}


def test_k_schedule_degenerate_settings():
    assert [k_schedule(s, 10, 32, 32, 0.5) for s in range(10)] == [32] * 10
    assert [k_schedule(s, 10, 32, 64, 0.0) for s in range(10)] == [32] * 10
    assert k_schedule(0, 10, 8, 64, 1.0) == 64 and k_schedule(9, 10, 8, 64, 1.0) == 8 + math.ceil(56 / 10)
    assert k_schedule(10**6, 10, 8, 64, 1.0) == 8
    with pytest.raises(RanklensError, match="k_initial=4"):
        k_schedule(0, 10, 8, 4, 0.5)
    with pytest.raises(RanklensError, match="anneal_fraction=2"):
        k_schedule(0, 10, 8, 16, 2)


def test_l1_warmup():
    assert l1_warmup(0, 0) == 1.0
    assert l1_warmup(0, 100) == 0.01
    assert l1_warmup(49, 100) == 0.5
    assert l1_warmup(99, 100) == 1.0
    assert l1_warmup(10_000, 100) == 1.0
    with pytest.raises(RanklensError, match="warmup_steps=-5"):
        l1_warmup(0, -5)
