"""One trainer for every sparse dictionary (SAEs and Lorsa).

The trainer owns what is common: the optimizer (Adam or SparseAdam, App. M), the three-phase learning-rate
schedule (App. E.1), K annealing (App. L.2), dead-feature tracking (footnote 2), periodic checkpoints that resume
bit-exactly (weights, optimizer moments, firing counters, step, data position), `metrics.jsonl`, progress and
optional Weights & Biases logging. What is specific to a dictionary lives behind the `Objective` protocol: how a
batch becomes a loss, which features were active, and what to do after a step (e.g. renormalize decoder rows).

The data source is any `BatchSource`: an iterable factory that can start at a given step, so resuming never
repeats or skips a batch.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ranklens.distributed import Layout
from ranklens.errors import RanklensError
from ranklens.io import atomic_write_bytes, atomic_write_text
from ranklens.tensor_tree import TreeFileError, load_tree, save_tree
from ranklens.train.dead import FiringTracker
from ranklens.train.optim import make_optimizer
from ranklens.train.schedules import k_schedule, lr_multiplier

CHECKPOINT_NAME = "checkpoint.safetensors"  # ranklens.tensor_tree: tensors and JSON, never a pickle
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.safetensors"  # the one before, in case the last is damaged
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"  # format 1, read with torch.load(weights_only=True) only
METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "curve.jsonl"  # held-out evaluations during training (``Trainer.train(evaluate=..., eval_steps=...)``)


@dataclass
class StepContext:
    """What the trainer tells the objective about the current step."""

    step: int
    k: int | None  # the (possibly annealed) number of active features
    dead_mask: torch.Tensor  # [n_features] bool, features not fired within the dead window
    layout: Layout = field(default_factory=Layout)  # the ranks of a torchrun job (one process: a no-op)


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar to backpropagate
    active: torch.Tensor  # int64 indices of features active in the batch (incl. AuxK's), for SparseAdam + tracking
    n_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """A dictionary being trained: parameters, per-batch loss, post-step hook."""

    n_features: int

    def param_spec(self) -> list[tuple[torch.nn.Parameter, bool]]: ...  # (param, row_sparse on dim 0)

    def step_loss(self, batch: Any, ctx: StepContext) -> StepResult: ...

    def after_step(self) -> None: ...

    def nonfinite_reason(self, batch: Any) -> str: ...  # why a loss was not finite, from the batch's values

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


BatchSource = Callable[[int], Iterator[Any]]  # start step -> batches from that step on
Evaluator = Callable[[], dict[str, float]]  # held-out metrics of the dictionary as it is now


@dataclass(frozen=True)
class TrainSettings:
    total_steps: int
    lr: float
    optimizer: str = "adam"  # adam | sparseadam
    bias_correction: str = "per_row"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 500
    decay_fraction: float = 0.2
    k: int | None = None
    k_initial: int | None = None  # K annealing from k_initial to k (App. L.2); None = constant k
    k_anneal_fraction: float = 0.0
    dead_window_tokens: int = 10_000_000
    checkpoint_every: int = 500  # steps
    log_every: int = 50
    wandb_project: str | None = None
    what: str = "the dictionary"  # named in errors, e.g. "the SAE on L15.attn_out"


class Trainer:
    """Trains one dictionary. Under torchrun (``layout``) every rank runs one: the replicas of a block of features
    add their gradients (each computed on its share of the global batch against the batch's global normalizer),
    take the union of their active features and the sum of their tokens, so every replica makes the same update as
    one process on the whole batch. Rank 0 writes the logs; the first replica of each block writes its checkpoint.

    Without a ``run_dir`` (training in a notebook) nothing is written: no checkpoint, and the log rows are kept in
    ``history`` ({"metrics": [...], "curve": [...]})."""

    def __init__(self, objective: Objective, settings: TrainSettings, run_dir: Path | None, progress: bool = True,
                 layout: Layout | None = None) -> None:
        self.objective = objective
        self.settings = settings
        self.run_dir = None if run_dir is None else Path(run_dir)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history: dict[str, list[dict[str, Any]]] = {METRICS_NAME: [], CURVE_NAME: []}
        self.layout = layout or Layout()
        self.progress = progress and self.layout.main
        self.optimizer = make_optimizer(settings.optimizer, objective.param_spec(), lr=settings.lr,
                                        betas=settings.betas, eps=settings.eps,
                                        bias_correction=settings.bias_correction)
        device = objective.param_spec()[0][0].device
        self.tracker = FiringTracker(objective.n_features, device=device)
        self.step = 0
        self._wandb = None

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "objective": self.objective.state_dict(), "optimizer": self.optimizer.state_dict(),
                "tracker": self.tracker.state_dict(), "layout": [self.layout.data, self.layout.shards]}

    def save_checkpoint(self) -> None:
        """Write the state atomically, keeping the previous checkpoint beside it (the first replica of each block of
        features writes its block's checkpoint; the others wait, so no rank resumes from a half-saved step)."""
        if self.run_dir is None:
            return
        if self.layout.data_rank == 0:
            current, previous = self.checkpoint_files()[:2]
            if current.exists():
                os.replace(current, previous)
            save_tree(current, self._state())
        self.layout.barrier()

    def checkpoint_files(self) -> list[Path]:
        """This block's (current, previous, format-1) checkpoint files."""
        s = self.layout.shards
        names = [CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME]
        if s > 1:
            names = [n.replace("checkpoint", f"checkpoint.shard{self.layout.shard_rank}-of-{s}") for n in names]
        return [self.run_dir / n for n in names] + [self.run_dir / LEGACY_CHECKPOINT_NAME]

    def load_checkpoint(self) -> bool:
        """Resume from the newest readable checkpoint (a damaged one is skipped with a message); then drop the log
        lines written after it, so a resumed run logs each step once. False when training starts from step 0."""
        if self.run_dir is None:
            return False
        loaded = False
        for path in (p for p in self.checkpoint_files() if p.exists()):
            try:
                state = _read_checkpoint(path)
            except CheckpointError as err:
                _note(f"{path} is not a readable checkpoint ({err}); ignoring it")
                continue
            self._load_state(state, path)
            loaded = True
            break
        else:
            if any(p.exists() for p in self.checkpoint_files()):
                _note(f"no readable checkpoint in {self.run_dir}; training starts over from step 0")
        for name in (METRICS_NAME, CURVE_NAME):
            self._truncate_log(name)
        return loaded

    def _load_state(self, state: dict[str, Any], path: Path) -> None:
        saved = state.get("layout", [1, 1])
        if list(saved) != [self.layout.data, self.layout.shards]:
            raise RanklensError(f"{path} was written by {saved[0]} data-parallel x {saved[1]} feature-sharded ranks; "
                                f"this run has {self.layout.data} x {self.layout.shards}: resume with the same "
                                "torchrun world size and --shards")
        try:
            self.objective.load_state_dict(state["objective"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.tracker.load_state_dict(state["tracker"])
        except (RuntimeError, ValueError, KeyError) as err:  # e.g. a size mismatch: another run's checkpoint
            raise RanklensError(f"{path} does not fit this run ({str(err).splitlines()[0]}); expected the "
                                "checkpoint of the same command, or remove it to start over") from None
        self.step = int(state["step"])

    def _truncate_log(self, name: str) -> None:
        """Keep the lines logged up to the current step. A torn last line (a kill in the middle of an append) is
        dropped with a message; a damaged line before the last is an error."""
        path = self.run_dir / name
        if not self.layout.main or not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append((json.loads(line)["step"], line))
            except (json.JSONDecodeError, KeyError, TypeError):
                if i < len(lines) - 1:
                    raise RanklensError(f"{path} line {i + 1} is not a JSON row; expected one row per line "
                                        "(only a last line can be torn by a kill)") from None
                _note(f"dropped the torn last line of {path}")
        keep = [line for step, line in rows if step <= self.step]
        atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())

    def _append(self, name: str, row: dict[str, Any]) -> None:
        if not self.layout.main:
            return
        if self.run_dir is None:
            self.history[name].append(row)
            return
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ training

    def current_k(self) -> int | None:
        s = self.settings
        if s.k is None or s.k_initial is None:
            return s.k
        return k_schedule(self.step, s.total_steps, s.k, s.k_initial, s.k_anneal_fraction)

    def _lr(self) -> float:
        s = self.settings
        return s.lr * lr_multiplier(self.step, s.total_steps, s.warmup_steps, s.decay_fraction)

    def train(self, batches: BatchSource, evaluate: Evaluator | None = None, eval_steps: Iterable[int] = ()) -> None:
        """Run (or resume) until `total_steps`; checkpoints at the end. After each step in `eval_steps`, the row
        `evaluate()` returns (held-out metrics) is appended to curve.jsonl with the step and the tokens seen; an
        evaluation is part of its step, so a resumed run redoes exactly those after its checkpoint."""
        self.start(evaluate, eval_steps)
        source = batches(self.step)
        while not self.done:
            try:
                batch = next(source)
            except StopIteration:
                raise RuntimeError(f"the data ran out at step {self.step} of {self.settings.total_steps}") from None
            self.advance(batch)
        self.finish()

    @property
    def done(self) -> bool:
        return self.step >= self.settings.total_steps

    def start(self, evaluate: Evaluator | None = None, eval_steps: Iterable[int] = ()) -> None:
        """Resume from the checkpoint (if any) and get ready to ``advance``; ``train`` and group training
        (``ranklens.train.group``) call it once."""
        self._evaluate = evaluate
        self._eval_steps = set(eval_steps) if evaluate is not None else set()
        self.load_checkpoint()
        self._bar = tqdm(total=self.settings.total_steps, initial=self.step, unit="step", desc="train",
                         disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        self._start_wandb()
        self._window: list[dict[str, float]] = []
        self._started = time.monotonic()
        self._tokens_at_start = int(self.tracker.tokens_seen)

    def advance(self, batch: Any) -> None:
        """One training step on ``batch``, then its log line, held-out evaluation and checkpoint when due."""
        s = self.settings
        self._window.append(self._one_step(batch))
        self.step += 1
        self._bar.update(1)
        if self.step % s.log_every == 0 or self.step == s.total_steps:
            self._log(self._window, self._started, self._tokens_at_start)
            self._bar.set_postfix(fvu=f"{self._window[-1].get('fvu', float('nan')):.4f}")
            self._window = []
        if self.step in self._eval_steps and self.layout.main:
            self._append(CURVE_NAME, {"step": self.step, "tokens": int(self.tracker.tokens_seen), **self._evaluate()})
        if self.step % s.checkpoint_every == 0 or self.step == s.total_steps:
            self.save_checkpoint()

    def finish(self) -> None:
        self._bar.close()

    def _one_step(self, batch: Any) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        ctx = StepContext(self.step, self.current_k(), self.tracker.dead_mask(self.settings.dead_window_tokens),
                          self.layout)
        # None, not zeros: backward then hands each parameter its fresh gradient instead of adding it into a zeroed
        # buffer (two passes over every [n_features, d] tensor saved); every parameter gets a gradient each step.
        self.optimizer.zero_grad(set_to_none=True)
        result = self.objective.step_loss(batch, ctx)
        if not torch.isfinite(result.loss):
            raise RanklensError(f"the loss became {float(result.loss.detach())} at step {self.step} of {self.settings.what}: "
                                f"{self.objective.nonfinite_reason(batch)}")
        result.loss.backward()
        active, n_tokens = result.active, result.n_tokens
        if self.layout.data > 1:  # the replicas' sum is the gradient of the whole batch's loss
            for p, _ in self.objective.param_spec():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.layout.data_sum_(p.grad)
            fired = torch.zeros(self.objective.n_features, dtype=torch.int32, device=active.device)
            fired[active] = 1
            active = self.layout.data_sum_(fired).nonzero().squeeze(1)
            n_tokens = int(self.layout.data_sum_(torch.tensor(n_tokens)))
        self.optimizer.step(active_rows=active)
        self.objective.after_step()
        self.tracker.update(active, n_tokens)
        loss = float(self.layout.data_sum_(result.loss.detach().clone()))  # the replicas' shares add up
        return {"loss": loss, **result.metrics, "lr": self.optimizer.param_groups[0]["lr"],
                "k": ctx.k if ctx.k is not None else float("nan"), "n_tokens": n_tokens}

    def n_dead(self) -> int:
        """Features not fired in the dead window, over every block of a feature-sharded dictionary."""
        local = torch.tensor(self.tracker.n_dead(self.settings.dead_window_tokens))
        return int(self.layout.shard_sum_(local) if self.layout.shards > 1 else local)

    def _log(self, window: list[dict[str, float]], started: float, tokens_at_start: int) -> None:
        keys = [k for k in window[-1] if k not in ("n_tokens",)]
        row = {"step": self.step, "tokens": int(self.tracker.tokens_seen)}
        for key in keys:
            values = [w[key] for w in window if key in w and not math.isnan(w[key])]
            row[key] = sum(values) / len(values) if values else float("nan")
        row["dead"] = self.n_dead()
        row["dead_window_tokens"] = self.settings.dead_window_tokens
        elapsed = time.monotonic() - started
        row["tokens_per_second"] = (int(self.tracker.tokens_seen) - tokens_at_start) / elapsed if elapsed > 0 else 0.0
        self._append(METRICS_NAME, row)
        if self._wandb is not None:
            self._wandb.log(row, step=self.step)

    def _start_wandb(self) -> None:
        if not self.settings.wandb_project:
            return
        try:
            import wandb
        except ImportError:
            print("warning: --wandb-project given but wandb is not installed; logging to metrics.jsonl only",
                  file=sys.stderr)
            return
        where = {} if self.run_dir is None else {"dir": str(self.run_dir), "id": wandb_run_id(self.run_dir),
                                                  "name": self.run_dir.name}
        self._wandb = wandb.init(project=self.settings.wandb_project, resume="allow", **where)


WANDB_ID_NAME = "wandb_id.txt"


def wandb_run_id(run_dir: Path) -> str:
    """The Weights & Biases run id of a run directory: made once (its name plus 8 random hex digits) and kept in
    the directory, so a resumed run logs into its own wandb run, and two run directories that share a name (say
    runs/a/sae and runs/b/sae) never log into one wandb run, as they did when the id was the name."""
    path = Path(run_dir) / WANDB_ID_NAME
    if path.exists():
        saved = path.read_text().strip()
        if saved:
            return saved
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(run_dir).resolve().name).strip("-")[:48] or "run"
    run_id = f"{stem}-{uuid.uuid4().hex[:8]}"
    atomic_write_text(path, run_id + "\n")
    return run_id


def remove_checkpoints(run_dir: str | Path) -> None:
    """Delete a finished run's checkpoints (they only serve resuming)."""
    for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME):
        (Path(run_dir) / name).unlink(missing_ok=True)


class CheckpointError(Exception):
    """A checkpoint file that cannot be read safely."""


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state: a tensor tree, or a format-1 ``torch.save`` file read with ``weights_only=True`` (which
    loads tensors and plain containers only and refuses anything that would run code)."""
    if path.suffix == ".pt":
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors alike mean "unreadable"
            raise CheckpointError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    try:
        return load_tree(path)
    except TreeFileError as err:
        raise CheckpointError(str(err)) from None


def _note(message: str) -> None:
    print(f"ranklens: {message}", file=sys.stderr)


def describe_values(x: torch.Tensor, where: str) -> str:
    """Why a loss on ``x`` was not finite: non-finite values in the data, values too large to square in float32, or
    (with finite, moderate data) the optimization itself."""
    x = x.detach()
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        return (f"the {where} hold {int((~finite).sum())} NaN or inf values; the activations themselves are not "
                "finite (check the model's dtype and the store)")
    peak = float(x.abs().max()) if x.numel() else 0.0
    if peak > 1e15:
        return (f"the {where} reach |x| = {peak:.3g}, whose squares overflow float32; scale the activations down "
                "or check the model")
    return f"the {where} are finite (max |x| = {peak:.3g}), so the optimization diverged; lower the learning rate"
