"""Training schedules as pure functions of the step: learning rate (paper App. E.1 / O.1), K annealing (App. L.2) and
the sparsity-coefficient warm-up (App. E.4).

Step convention, shared by every function here: ``step`` is the 0-based index of the optimizer step about to be
taken (0, 1, ..., total_steps - 1), which is also what ``torch.optim.lr_scheduler.LambdaLR`` passes to its lambda
when ``scheduler.step()`` follows ``optimizer.step()``. Being pure functions of (step, run length), the schedules need
no state of their own: a resumed run recomputes them from its step counter and gets the same values.

Warm-ups ramp as (step + 1) / warmup_steps: step 0 already gets 1 / warmup_steps (the first step is not wasted on a
zero value) and the last warm-up step, warmup_steps - 1, gets exactly 1. Decays mirror this: the last step of the
run, total_steps - 1, gets exactly the final value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ranklens.errors import RanklensError

__all__ = ["MAX_WARMUP_SHARE", "capped_warmup", "k_schedule", "l1_warmup", "lr_lambda", "lr_multiplier"]

# The most of a run the learning-rate warm-up may take. The paper's 500 of ~195k steps is 0.26%; a fixed 500 on a
# run of a few hundred steps would spend most of it warming up, which is a different experiment.
MAX_WARMUP_SHARE = 0.1


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RanklensError(f"{name}={value!r}: expected an integer >= {minimum}")
    return value


def _fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise RanklensError(f"{name}={value!r}: expected a number in [0, 1]")
    return float(value)


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int = 500,
    decay_fraction: float = 0.2,
    final_fraction: float = 0.01,
) -> float:
    """The factor applied to the maximum learning rate at ``step`` (paper App. E.1 and O.1).

    The paper's three phases: "The learning rate increases linearly from zero to its maximum value over the first 500
    steps, remains constant during the intermediate phase, and then decays linearly to 1% of the maximum value over the
    final 20% of the total training steps." With D = round(decay_fraction * total_steps) decay steps and W warm-up
    steps (see short runs below):

    * warm-up, 0 <= step < W: (step + 1) / W, so step 0 gives 1/W (not 0) and step W - 1 gives 1;
    * constant, W <= step < total_steps - D: 1;
    * decay, total_steps - D <= step: final_fraction + (1 - final_fraction) * (total_steps - 1 - step) / D, a line
      from 1 (reached one step before the decay) whose first step is just below 1 and whose last step, total_steps - 1,
      gives exactly final_fraction;
    * steps past the end (step >= total_steps) stay at final_fraction.

    Short runs (total_steps < warmup_steps + D): the warm-up shrinks to the steps before the decay,
    W = min(warmup_steps, total_steps - D), so there is no constant phase and the decay keeps its share of the run;
    with decay_fraction = 1 the whole run is the decay and there is no warm-up. The value is always in (0, 1]
    (or [0, 1] with final_fraction = 0), and in [final_fraction, 1] after the warm-up.
    """
    step = _int("step", step, 0)
    total_steps = _int("total_steps", total_steps, 1)
    warmup_steps = _int("warmup_steps", warmup_steps, 0)
    decay_fraction = _fraction("decay_fraction", decay_fraction)
    final_fraction = _fraction("final_fraction", final_fraction)
    decay_steps = min(total_steps, round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    warm = min(warmup_steps, decay_start)
    if step >= total_steps:
        return final_fraction
    if step < warm:
        return (step + 1) / warm
    if step < decay_start:
        return 1.0
    remaining = (total_steps - 1 - step) / decay_steps  # in [0, 1): exactly 0 at the last step
    return min(1.0, final_fraction + (1.0 - final_fraction) * remaining)


def capped_warmup(warmup_steps: int, total_steps: int, max_share: float = MAX_WARMUP_SHARE) -> tuple[int, str | None]:
    """(warm-up steps to use, a warning or None): ``warmup_steps`` capped at ``max_share`` of the run (at least one
    step when warm-up was asked for), with a warning that names both numbers when the cap applies."""
    cap = max(1, int(max_share * total_steps))
    if warmup_steps <= cap:
        return warmup_steps, None
    return cap, (f"warm-up of {warmup_steps} steps is more than {max_share:.0%} of the {total_steps}-step run; "
                 f"using {cap}")


def lr_lambda(
    total_steps: int,
    warmup_steps: int = 500,
    decay_fraction: float = 0.2,
    final_fraction: float = 0.01,
) -> Callable[[int], float]:
    """``lr_multiplier`` with the run's parameters bound, for ``torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(T))``
    (call ``scheduler.step()`` after ``optimizer.step()``). Arguments are validated now, not at the first step."""
    lr_multiplier(0, total_steps, warmup_steps, decay_fraction, final_fraction)
    return functools.partial(lr_multiplier, total_steps=total_steps, warmup_steps=warmup_steps,
                             decay_fraction=decay_fraction, final_fraction=final_fraction)


def k_schedule(step: int, total_steps: int, k_final: int, k_initial: int, anneal_fraction: float) -> int:
    """K of a TopK dictionary at ``step`` under K annealing (paper App. L.2, after He et al. 2024, Llama Scope).

    K starts at ``k_initial`` and decreases linearly to ``k_final`` over the first A = round(anneal_fraction *
    total_steps) steps, then stays at ``k_final``. Linear interpolation, rounded up so K is never below the line:
    K(step) = k_final + ceil((k_initial - k_final) * (A - step) / A) for step < A (exact integer arithmetic), so
    K(0) = k_initial, K(A) = k_final, and K is non-increasing. With A = 0 (anneal_fraction 0) K is k_final throughout.
    (App. L.2 reports that ASI does not help under this schedule: the high-K phase lets features drift out of the
    active subspace.)
    """
    step = _int("step", step, 0)
    total_steps = _int("total_steps", total_steps, 1)
    k_final = _int("k_final", k_final, 1)
    k_initial = _int("k_initial", k_initial, 1)
    if k_initial < k_final:
        raise RanklensError(f"k_initial={k_initial}: expected k_initial >= k_final ({k_final})")
    anneal_fraction = _fraction("anneal_fraction", anneal_fraction)
    anneal_steps = min(total_steps, round(anneal_fraction * total_steps))
    if step >= anneal_steps:
        return k_final
    return k_final + -((-(k_initial - k_final) * (anneal_steps - step)) // anneal_steps)


def l1_warmup(step: int, warmup_steps: int) -> float:
    """Multiplier of a ReLU/JumpReLU sparsity coefficient at ``step``: min(1, (step + 1) / warmup_steps), 1 when
    ``warmup_steps`` is 0 (paper App. E.4: the Conerly et al. 2025 setting warms the sparsity coefficient up globally,
    which starts training at a high L0; App. E.4 and L.1 keep it fixed, ``warmup_steps=0``, for ASI to work)."""
    step = _int("step", step, 0)
    warmup_steps = _int("warmup_steps", warmup_steps, 0)
    if warmup_steps == 0 or step + 1 >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps

