"""SparseAdam: Adam that touches only the active features' rows (paper Section 5.3 and Appendix M).

Why. Appendix M of the paper (after Bricken et al. 2023a) names *stale momentum* as a root cause of dead features: with
ordinary Adam, a feature that stays inactive keeps being moved by its decaying first moment, and when it fires again
its update is dominated by that stale history. The paper's remedy is SparseAdam, which "updates both parameters and
moments only when the corresponding feature is active" (App. M), used with lr 6e-5 (App. E.1: betas (0.9, 0.999),
eps 1e-8); Section 5.3 shows ASI + SparseAdam gives the fewest dead features at scale.

Conventions (shared with the SAE and Lorsa code): every per-feature tensor has the feature on dim 0 (SAE: W_E
[n_features, d_in], b_E [n_features], W_D [n_features, d_in]; Lorsa: W_V, W_O [n_heads, d] and per-head biases
[n_heads]). Gradients are ordinary *dense* tensors; the trainer knows which features were active in the batch (the
union of the top-k indices and of the AuxK indices) and passes them to ``step(active_rows)``.

Semantics of ``SparseAdam.step(active_rows)``:

* Param groups with ``row_sparse=True``: only the rows in ``active_rows`` are read and written. For each of them the
  two moments are updated with the row's gradient and the row's parameters are moved; every other row keeps its
  parameters *and* both moments bit-identical (lazy, as App. M asks; this is what the llamascopium implementation
  gets wrong by decaying the moments of inactive entries every step). The work is ``index_select`` of the active rows,
  arithmetic on them, ``index_copy_`` back, so it grows with the number of active rows, not with n_features.
  ``active_rows`` is an int64 tensor of feature indices (any shape, e.g. the [batch, k] top-k indices; duplicates are
  fine) or a bool mask [n_features]; one set applies to every row-sparse parameter, so they must share dim 0.
  ``active_rows=None`` falls back to "rows whose gradient is nonzero anywhere", decided per parameter (what
  ``torch.optim.SparseAdam`` does with a sparse gradient); this scans the whole gradient, so it costs O(n_features *
  d) and is meant for tests and small runs.
* Param groups with ``row_sparse=False`` (the decoder bias b_D, Lorsa's shared Q/K weights, ...): ordinary dense Adam,
  computed by ``torch.optim.adam.adam`` with the arguments ``torch.optim.Adam`` passes, hence bit-identical to it.

Bias correction of the row-sparse rows (``bias_correction``):

* ``"per_row"`` (default): each row carries its own step count (state ``"step"``, int64 [n_rows]), incremented only
  when the row is active. A row's t-th active step is exactly Adam's t-th step on that row's gradient history,
  ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, so a feature's first update, whenever it comes, has
  Adam's first-step size (about lr per coordinate). Why the default: with a per-tensor count, a feature that first
  fires at global step 10,000 has m = (1 - b1) g and v = (1 - b2) g^2 with corrections 1 - b^10000 ~ 1, so its first
  step is only (1 - b1) / sqrt(1 - b2) ~ 0.32 of Adam's; rarely active features would learn ~3x slower.
* ``"per_tensor"``: one count per tensor (state ``"step"``, int64 scalar on the CPU), incremented at every ``step()``
  in which the parameter has a gradient, and the update formula of ``torch.optim.SparseAdam`` (the paper's
  optimizer): ``p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``. This reproduces
  ``torch.optim.SparseAdam`` fed the active rows as a sparse COO gradient, bit for bit. Note the two formulas place eps
  differently (eps vs eps * sqrt(1 - b2^t) in bias-corrected units), which matters only while v is near eps^2; each
  mode is exact against its reference rather than the two modes sharing one formula.

Exactness: ``"per_row"`` follows Adam's single-tensor op sequence (``lerp_``, ``mul_().addcmul_()``, division by
sqrt(1 - b2^t), ``addcdiv_``) on the gathered rows, with the bias corrections taken from a float64 table that Python
computes exactly as Adam does (``torch.pow``/``sqrt`` differ from C ``pow`` in the last bit now and then); the tests
find every row bit-identical to ``torch.optim.Adam`` run on that row alone, in float32 and float64 (in principle the
vectorised and scalar tails of torch's CPU kernels, which depend on a tensor's length, could round one ulp apart).
Results are deterministic run to run. For bfloat16 parameters the per-row step size is rounded to bfloat16 where torch
keeps its scalar in float32.

State and resume: per parameter, ``"step"``, ``"exp_avg"``, ``"exp_avg_sq"`` in ``self.state``; ``state_dict()`` and
``load_state_dict()`` are torch's, so checkpoints round-trip and training resumes bit-exactly. ``load_state_dict``
additionally puts per-row counts on the parameter's device as int64, checks their shape against the (loaded) mode, and
clones the loaded tensors so the optimizer never aliases the caller's dictionary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.adam import adam as _functional_adam

from ranklens.errors import RanklensError

__all__ = ["Adam", "BiasCorrection", "SparseAdam", "make_optimizer"]

BiasCorrection = Literal["per_row", "per_tensor"]
_BIAS_CORRECTIONS = ("per_row", "per_tensor")
_OPTIMIZERS = ("adam", "sparseadam")


def _check_hparams(lr: Any, betas: Any, eps: Any, bias_correction: Any) -> None:
    if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise RanklensError(f"lr={lr!r}: expected a finite float >= 0")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise RanklensError(f"betas={betas!r}: expected a pair of floats in [0, 1)") from None
    for b in (b1, b2):
        if isinstance(b, Tensor) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise RanklensError(f"betas={betas!r}: expected a pair of floats in [0, 1)")
    if isinstance(eps, Tensor) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise RanklensError(f"eps={eps!r}: expected a finite float >= 0")
    if bias_correction not in _BIAS_CORRECTIONS:
        raise RanklensError(f"bias_correction={bias_correction!r}: expected one of {', '.join(_BIAS_CORRECTIONS)}")


def _check_group(group: dict[str, Any]) -> None:
    _check_hparams(group["lr"], group["betas"], group["eps"], group["bias_correction"])
    if not isinstance(group["row_sparse"], bool):
        raise RanklensError(f"row_sparse={group['row_sparse']!r}: expected True or False")
    if group["row_sparse"]:
        for p in group["params"]:
            if p.dim() < 1:
                raise RanklensError(
                    f"a row_sparse parameter of shape {tuple(p.shape)}: expected at least one dim (features on dim 0)"
                )


def _scalar_dtype() -> torch.dtype:
    # What torch.optim.Adam uses for its CPU step counter (torch.optim.optimizer._get_scalar_dtype).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _ActiveRows:
    """The trainer's active feature set for one ``step``: validated once, turned into sorted unique row indices once
    per (n_rows, device)."""

    def __init__(self, active_rows: Tensor) -> None:
        if not isinstance(active_rows, Tensor):
            raise RanklensError(
                f"active_rows of type {type(active_rows).__name__}: expected an int64 index tensor, a bool mask or None"
            )
        if active_rows.dtype == torch.bool:
            if active_rows.dim() != 1:
                raise RanklensError(
                    f"active_rows mask of shape {tuple(active_rows.shape)}: expected a 1-D bool mask [n_features]"
                )
            self.mask: Tensor | None = active_rows
            self.flat = None
            self.lo = self.hi = None
        elif not active_rows.dtype.is_floating_point and not active_rows.dtype.is_complex:
            self.mask = None
            self.flat = active_rows.reshape(-1).to(torch.int64)
            n = self.flat.numel()
            self.lo = int(self.flat.min()) if n else None
            self.hi = int(self.flat.max()) if n else None
        else:
            raise RanklensError(
                f"active_rows of dtype {active_rows.dtype}: expected int64 feature indices or a bool mask"
            )
        self._cache: dict[tuple[int, torch.device], Tensor] = {}

    def for_param(self, p: Tensor) -> Tensor:
        n_rows = p.shape[0]
        if self.mask is not None and self.mask.numel() != n_rows:
            raise RanklensError(
                f"active_rows mask of length {self.mask.numel()}: expected one entry per row of a row_sparse "
                f"parameter ({n_rows} rows)"
            )
        if self.lo is not None and (self.lo < 0 or self.hi >= n_rows):  # type: ignore[operator]
            bad = self.lo if self.lo < 0 else self.hi
            raise RanklensError(f"active_rows index {bad}: expected feature indices in [0, {n_rows})")
        key = (n_rows, p.device)
        idx = self._cache.get(key)
        if idx is None:
            mask = self.mask
            if mask is None:
                # Indices may repeat (top-k indices [tokens, k]); index_copy_ with a repeated index would write a row
                # twice. A scatter into a bool mask and nonzero() dedupes and sorts in O(n_rows + n_indices), a
                # byte per feature, cheaper than sorting tokens * k indices with torch.unique.
                mask = torch.zeros(n_rows, dtype=torch.bool, device=p.device)
                mask[self.flat.to(p.device)] = True  # type: ignore[union-attr]
            idx = self._cache[key] = mask.to(p.device).nonzero().squeeze(1)
        return idx


def _nonzero_rows(grad: Tensor) -> Tensor:
    """The ``active_rows=None`` fallback: rows whose gradient is nonzero anywhere (O(n_rows * d))."""
    return (grad.reshape(grad.shape[0], -1) != 0).any(dim=1).nonzero().squeeze(1)


class SparseAdam(torch.optim.Optimizer):
    """Adam with lazy, row-sparse updates of the features' parameters (paper App. M); see the module docstring.

    Args:
        params: parameters or param groups (dicts). A group may set ``row_sparse`` (default False),
            ``bias_correction``, ``lr``, ``betas``, ``eps``.
        lr: learning rate (paper App. E.1: 6e-5 for SparseAdam).
        betas, eps: as ``torch.optim.Adam`` (paper App. E.1: (0.9, 0.999), 1e-8).
        bias_correction: ``"per_row"`` (one step count per row, incremented when the row is active) or
            ``"per_tensor"`` (one count per tensor, exactly ``torch.optim.SparseAdam``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        bias_correction: BiasCorrection = "per_row",
    ) -> None:
        _check_hparams(lr, betas, eps, bias_correction)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "bias_correction": bias_correction,
                    "row_sparse": False}
        # An upper bound on every per-row step count (each step() adds at most 1), so the bias-correction tables
        # can be sized without reading the counts back from the device. Derived state: rebuilt on load.
        self._row_step_bound = 0
        self._bias_tables: dict[tuple[float, float, torch.device], Tensor] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        active_rows: Tensor | None = None,
        closure: Callable[[], float] | None = None,
    ) -> float | None:
        """One optimizer step. ``active_rows``: int64 feature indices (any shape) or a bool mask [n_features] for
        the row_sparse groups, or None for "rows with a nonzero gradient". A callable first argument is taken as a
        closure, so ``opt.step(closure)`` works as with any torch optimizer."""
        if callable(active_rows) and closure is None:
            closure, active_rows = active_rows, None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows = None if active_rows is None else _ActiveRows(active_rows)
        self._row_step_bound += 1
        for group in self.param_groups:
            if group["row_sparse"]:
                self._step_row_sparse(group, rows)
            else:
                self._step_dense(group)
        return loss

    def _step_dense(self, group: dict[str, Any]) -> None:
        # The same state layout and functional call as torch.optim.Adam.step with its defaults (foreach=None,
        # fused=None, no weight decay, no amsgrad), so the result is bit-identical to torch.optim.Adam.
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RanklensError(f"a sparse gradient for a parameter of shape {tuple(p.shape)}: expected dense")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype(), device="cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        _functional_adam(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=None, capturable=False, differentiable=False, fused=None, grad_scale=None, found_inf=None,
            has_complex=any(torch.is_complex(p) for p in params), decoupled_weight_decay=False,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=0.0, eps=group["eps"],
            maximize=False,
        )

    def _step_row_sparse(self, group: dict[str, Any], rows: _ActiveRows | None) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = float(group["lr"]), float(group["eps"])
        per_row = group["bias_correction"] == "per_row"
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RanklensError(
                    f"a sparse gradient for a parameter of shape {tuple(p.shape)}: expected a dense gradient "
                    "(pass the active features as active_rows)"
                )
            state = self.state[p]
            if not state:
                state["step"] = (torch.zeros(p.shape[0], dtype=torch.int64, device=p.device) if per_row
                                 else torch.zeros((), dtype=torch.int64))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            idx = _nonzero_rows(grad) if rows is None else rows.for_param(p)
            if per_row:
                table = self._bias_table(beta1, beta2, p.device)
                _per_row_update(p, grad, state, idx, lr, eps, beta1, beta2, table)
            else:
                _per_tensor_update(p, grad, state, idx, lr, beta1, beta2, eps)

    def _bias_table(self, beta1: float, beta2: float, device: torch.device) -> Tensor:
        """float64 [2, T]: 1 - beta1^t and (1 - beta2^t) ** 0.5 for t < T, computed by Python exactly as
        torch.optim.Adam computes its scalars (C pow; torch.pow and sqrt can differ from it in the last bit), so a
        row's step equals Adam's bit for bit; looked up per row with index_select. Grown by doubling."""
        key = (beta1, beta2, device)
        table = self._bias_tables.get(key)
        if table is None or table.shape[1] <= self._row_step_bound:
            size = max(64, self._row_step_bound + 1, 2 * (0 if table is None else table.shape[1]))
            rows = [[1 - beta1**t for t in range(size)], [(1 - beta2**t) ** 0.5 for t in range(size)]]
            table = self._bias_tables[key] = torch.tensor(rows, dtype=torch.float64, device=device)
        return table

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._row_step_bound = 0
        for group in self.param_groups:
            _check_group(group)
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                # torch keeps loaded "step" values as they are and returns other tensors uncopied when device and
                # dtype already match; clone so stepping this optimizer never writes into the caller's dict.
                for key, value in state.items():
                    if isinstance(value, Tensor):
                        state[key] = value.clone()
                if not group["row_sparse"]:
                    continue
                step = state.get("step")
                per_row = group["bias_correction"] == "per_row"
                want = (p.shape[0],) if per_row else ()
                if not isinstance(step, Tensor) or tuple(step.shape) != want:
                    got = tuple(step.shape) if isinstance(step, Tensor) else type(step).__name__
                    raise RanklensError(
                        f"a loaded step count of shape {got} for a row_sparse parameter of shape {tuple(p.shape)}: "
                        f"expected shape {want} for bias_correction={group['bias_correction']!r}"
                    )
                state["step"] = step.to(device=p.device if per_row else "cpu", dtype=torch.int64)
                if per_row and step.numel():
                    self._row_step_bound = max(self._row_step_bound, int(step.max()))


def _per_row_update(p: Tensor, grad: Tensor, state: dict[str, Any], idx: Tensor, lr: float, eps: float,
                    beta1: float, beta2: float, table: Tensor) -> None:
    """Adam on the active rows with one step count per row (torch.optim.Adam's single-tensor op sequence)."""
    if idx.numel() == 0:
        return
    steps = state["step"].index_select(0, idx).add_(1)
    state["step"].index_copy_(0, idx, steps)
    g = grad.index_select(0, idx)
    m = state["exp_avg"].index_select(0, idx)
    v = state["exp_avg_sq"].index_select(0, idx)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # Bias corrections in float64, the values of torch.optim.Adam's Python floats; rounded to the parameter dtype at
    # the same points where Adam's scalar arguments are (division by sqrt(bc2), the addcdiv value).
    bc1 = table[0].index_select(0, steps)
    bc2_sqrt = table[1].index_select(0, steps)
    shape = (-1,) + (1,) * (p.dim() - 1)
    # A true division (``lr / tensor`` would be reciprocal-then-multiply, one ulp off Adam's Python lr / bc1).
    neg_step_size = torch.div(torch.tensor(lr, dtype=torch.float64, device=bc1.device), bc1)
    neg_step_size = neg_step_size.neg_().to(p.dtype).view(shape)
    denom = v.sqrt().div_(bc2_sqrt.to(v.dtype).view(shape)).add_(eps)
    new_p = p.index_select(0, idx).addcdiv_(m * neg_step_size, denom)
    state["exp_avg"].index_copy_(0, idx, m)
    state["exp_avg_sq"].index_copy_(0, idx, v)
    p.index_copy_(0, idx, new_p)


def _per_tensor_update(p: Tensor, grad: Tensor, state: dict[str, Any], idx: Tensor, lr: float, beta1: float,
                       beta2: float, eps: float) -> None:
    """torch.optim.SparseAdam's update (torch.optim._functional.sparse_adam) on the active rows, op for op."""
    state["step"] += 1  # every step, as torch.optim.SparseAdam counts
    if idx.numel() == 0:
        return
    step = int(state["step"])
    g = grad.index_select(0, idx)
    old_m = state["exp_avg"].index_select(0, idx)
    old_v = state["exp_avg_sq"].index_select(0, idx)
    m = g.sub(old_m).mul_(1 - beta1).add_(old_m)
    v = g.pow(2).sub_(old_v).mul_(1 - beta2).add_(old_v)
    denom = v.sqrt().add_(eps)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr * math.sqrt(bias_correction2) / bias_correction1
    new_p = p.index_select(0, idx).add_(-step_size * m.div(denom))
    state["exp_avg"].index_copy_(0, idx, m)
    state["exp_avg_sq"].index_copy_(0, idx, v)
    p.index_copy_(0, idx, new_p)


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` whose ``step`` accepts and ignores ``active_rows``, so a trainer steps either optimizer
    the same way (paper App. E.1: Adam is the default optimizer; SparseAdam the App. M alternative)."""

    def step(  # type: ignore[override]
        self,
        active_rows: Tensor | None = None,
        closure: Callable[[], float] | None = None,
    ) -> float | None:
        if callable(active_rows) and closure is None:
            closure = active_rows
        # torch wraps Optimizer subclasses' step with its hook-calling profiler wrapper; this method is wrapped
        # already, so call the unwrapped Adam.step or step hooks would run twice.
        adam_step = torch.optim.Adam.step
        if getattr(adam_step, "hooked", False):
            adam_step = adam_step.__wrapped__  # type: ignore[attr-defined]
        return adam_step(self, closure)


def _fusable(params_spec: Sequence[tuple[Tensor, bool]]) -> bool:
    """torch's fused Adam takes floating-point tensors on CPU or CUDA, all on one device type."""
    devices = {p.device.type for p, _ in params_spec}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p, _ in params_spec)


def make_optimizer(
    name: Literal["adam", "sparseadam"],
    params_spec: Sequence[tuple[Tensor, bool]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    bias_correction: BiasCorrection = "per_row",
) -> Adam | SparseAdam:
    """The trainer's optimizer. ``params_spec``: (parameter, row_sparse) pairs, row_sparse meaning "features on dim 0,
    touched only when active". "adam" gives ``Adam`` (torch.optim.Adam with the same groups; the row_sparse flag is
    kept in the groups but ignored), "sparseadam" gives ``SparseAdam``. Both accept ``step(active_rows)``."""
    if name not in _OPTIMIZERS:
        raise RanklensError(f"optimizer {name!r}: expected one of {', '.join(_OPTIMIZERS)}")
    _check_hparams(lr, betas, eps, bias_correction)
    sparse: list[Tensor] = []
    dense: list[Tensor] = []
    for item in params_spec:
        try:
            param, row_sparse = item
        except (TypeError, ValueError):
            raise RanklensError(f"params_spec entry {item!r}: expected a (parameter, row_sparse) pair") from None
        if not isinstance(param, Tensor) or not isinstance(row_sparse, bool):
            raise RanklensError(
                f"params_spec entry ({type(param).__name__}, {row_sparse!r}): expected (Tensor, bool)"
            )
        (sparse if row_sparse else dense).append(param)
    groups = [{"params": ps, "row_sparse": flag} for ps, flag in ((sparse, True), (dense, False)) if ps]
    if not groups:
        raise RanklensError("params_spec is empty: expected at least one (parameter, row_sparse) pair")
    if name == "adam":
        # fused: one kernel per tensor instead of sqrt/div temporaries of every [n, d] parameter (on CPU, 23 ms
        # instead of 156 ms per step at 36,864 x 576; bench/README.md)
        return Adam(groups, lr=lr, betas=tuple(betas), eps=eps, fused=_fusable(params_spec))
    return SparseAdam(groups, lr=lr, betas=tuple(betas), eps=eps, bias_correction=bias_correction)
