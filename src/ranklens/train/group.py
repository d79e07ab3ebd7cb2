"""Several dictionaries trained in lockstep on data read once per step (``ranklens train sae --sites``).

Each member is an ordinary ``Trainer`` with its own run directory, checkpoints, logs and held-out curve; the group
only shares the batches: ``batches(step)`` yields, per step, a mapping from a member's data key (its site and data
seed) to its batch, so members of one site and data order get the very same tensor, and members of several sites
come from one model forward (on the fly) or one multi-site store. A member therefore computes exactly what its
single-site run computes. Members resume from their own checkpoints; the group restarts the data at the earliest
member's step, and a member that is ahead waits until the data reaches it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ranklens.train.trainer import Evaluator, Trainer

GroupSource = Callable[[int], Iterator[Mapping[Hashable, Any]]]  # start step -> per step {data key: batch}


@dataclass
class Member:
    trainer: Trainer
    key: Hashable  # which batch of the step this member trains on
    evaluate: Evaluator | None = None
    eval_steps: Iterable[int] = field(default_factory=tuple)


def train_group(members: list[Member], batches: GroupSource) -> None:
    total = {m.trainer.settings.total_steps for m in members}
    if len(total) != 1:
        raise ValueError(f"group members must train for the same number of steps, got {sorted(total)}")
    (total_steps,) = total
    for m in members:
        m.trainer.start(m.evaluate, m.eval_steps)
    step = min(m.trainer.step for m in members)
    source = batches(step)
    while step < total_steps:
        try:
            batch = next(source)
        except StopIteration:
            raise RuntimeError(f"the data ran out at step {step} of {total_steps}") from None
        for m in members:
            if m.trainer.step == step:
                m.trainer.advance(batch[m.key])
        step += 1
    for m in members:
        m.trainer.finish()
