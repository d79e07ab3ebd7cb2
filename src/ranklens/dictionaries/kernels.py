"""Sparse kernels for the hot path of sparse autoencoders (paper Section 3.2, Appendix E.4), plus dense references.

The TopK SAE of Section 3.2 is ``z = TopK(W_e x + b_e)``, ``x_hat = W_d z + b_d``. With the features as ROWS of every
per-feature tensor (``W_E [n, d]``, ``W_D [n, d]``, ``b_E [n]``) the only dense operation a TopK SAE needs is the
encoder's forward product ``x @ W_E.T`` [B, n], which top-k must see whole. Everything else touches the B x k selected
(token, feature) pairs only, so a training step costs one dense matmul plus O(B k d):

- ``topk_encode``: a ``torch.autograd.Function`` (after EleutherAI sparsify's fused encoder) whose backward never forms
  the dense [B, n] gradient. With G the [B, n] matrix holding the (ReLU-masked) incoming gradients at the selected pairs,
  grad_x = G W_E (an embedding_bag of k encoder rows per token), grad_W_E = G^T x (a CSR matrix of G^T, one row per
  feature, times x: MKL on CPU), grad_b_E = column sums of G (index_add_). The CSR product is the fastest of the
  forms tried (a COO tensor, index_add_ of a materialized [B k, d] tensor); bench/README.md has the timings.
- ``sparse_decode``: x_hat = embedding_bag over the k active decoder rows (B k d work, not B n d); its own backward
  (grad_W_D = Z^T grad_out by the same CSR product, grad_values by ``torch.sparse.sampled_addmm``) replaces
  embedding_bag's autograd, which is slower and accumulates bfloat16 weight gradients in bfloat16 (a 10% error on a
  frequently used row).

Dtypes: the encoder matmul runs in the dtype of x (bfloat16 activations use the AMX bf16 path even when the master
weights are float32); the decoder runs in the decoder's dtype. Gradients are accumulated in float32 when a parameter is
bfloat16/float16 (and in the parameter's dtype otherwise) and returned in each input's own dtype.

Index order: ``topk_encode`` returns each row's k indices in ASCENDING feature order (values permuted alongside), a
canonical form that is also what the CSR matrices need. Ties among equal pre-activations at the k-th place are broken
by ``torch.topk`` (deterministic for a given input and device, but not "lowest index first"); the dense reference
below uses the same call, so both agree.

Also here: ``batch_topk`` (Bussmann et al. 2024), the JumpReLU activation and Heaviside step with the straight-through
estimators of Rajamanoharan et al. (2024) (used in paper Appendix E.4 / L.1), and the naive dense references the tests
check the kernels against.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from ranklens.errors import RanklensError

__all__ = [
    "batch_topk",
    "batch_topk_threshold",
    "dense_topk_code",
    "dense_topk_sae_reference",
    "jumprelu",
    "rectangle",
    "sparse_decode",
    "step",
    "topk_encode",
]

# Rows of x per chunk in the encoder forward: the [chunk, n] pre-activation block is reused across chunks instead of
# allocating one fresh [B, n] tensor (600 MB at B=4096, n=36864 in float32), whose page faults are costly on the CPU
# (bench/README.md).
_PRE_CHUNK_BYTES = 128 << 20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which gradients are accumulated: float32 for half types (a sum over thousands of tokens in bf16 loses
    most of its bits), the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _csr(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] CSR matrix with row b holding values[b, j] at column indices[b, j] (indices ascending within each row)."""
    b, k = indices.shape
    crow = torch.arange(0, b * k + 1, k, device=indices.device, dtype=torch.int64)
    with warnings.catch_warnings():
        # torch warns once that CSR support is "beta"; the ops used here (mm, t, sampled_addmm) are tested below.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, indices.reshape(-1), values.reshape(-1), size=(b, n), check_invariants=False
        )


def _csr_transposed(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """[n, B] CSR matrix G^T where G [B, n] holds values[b, j] at column indices[b, j]: one row per feature.

    Built with a counting layout (bincount + cumsum) and one stable sort of the B*k feature ids, so that G^T @ x runs
    as a plain CSR x dense product. Why not ``_csr(...).t()``: sparse.mm converts that CSC view back to CSR with a
    generic sort that took ~160 ms per call at B*k = 204,800 here, against ~2-10 ms for this int32 sort.
    """
    b, k = indices.shape
    flat = indices.reshape(-1)
    keys = flat.to(torch.int32) if n < 2**31 else flat  # int32 sorts 2-10x faster than int64 on CPU
    order = torch.argsort(keys, stable=True)  # stable: tokens ascending within each feature's row
    crow = torch.zeros(n + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(flat, minlength=n), 0, out=crow[1:])
    tokens = torch.div(order, k, rounding_mode="floor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, tokens, values.reshape(-1)[order], size=(n, b), check_invariants=False
        )


def _sorted_rows(indices: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sort each row of indices ascending and permute the other [B, k] tensors alike (CSR needs sorted columns)."""
    idx, perm = torch.sort(indices, dim=1)
    return (idx, *(t.gather(1, perm) for t in others))


def _check_2d(name: str, t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise RanklensError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise RanklensError(f"{what}: {name} must be 2-D, got shape {tuple(t.shape)}")
    return t


def _check_k(k: Any, n: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise RanklensError(f"{what}: k={k!r}; expected an int with 1 <= k <= n_features={n}")
    return k


# --------------------------------------------------------------------------- TopK encoder


class _TopKEncode(torch.autograd.Function):
    """values, indices = relu(topk(x @ W_E.T + b_E, k)), with a backward over the B x k selected pairs only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W_E: torch.Tensor, b_E: torch.Tensor, k: int, chunk: int):  # type: ignore[override]
        B = x.shape[0]
        n = W_E.shape[0]
        w = W_E if W_E.dtype == x.dtype else W_E.to(x.dtype)  # the matmul runs in the input's dtype
        bias = b_E if b_E.dtype == x.dtype else b_E.to(x.dtype)
        wt = w.t()
        values = torch.empty(B, k, dtype=x.dtype, device=x.device)
        indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
        buf = torch.empty(min(chunk, B), n, dtype=x.dtype, device=x.device)
        for i in range(0, B, chunk):
            xc = x[i : i + chunk]
            pre = torch.addmm(bias, xc, wt, out=buf[: xc.shape[0]])
            torch.topk(pre, k, dim=1, out=(values[i : i + chunk], indices[i : i + chunk]))
        indices, values = _sorted_rows(indices, values)
        values = values.clamp_min_(0)  # Section 3.2 codes are non-negative: ReLU after the selection
        ctx.save_for_backward(x, W_E, indices, values)
        ctx.b_dtype = b_E.dtype
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor | None, _grad_indices: Any):  # type: ignore[override]
        x, W_E, indices, values = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_values is None:
            return None, None, None, None, None
        n = W_E.shape[0]
        acc = _acc_dtype(W_E.dtype)
        # ReLU's derivative: zero where the selected pre-activation was <= 0 (those values were clamped to 0).
        g = torch.where(values > 0, grad_values, torch.zeros((), dtype=grad_values.dtype, device=grad_values.device))
        g = g.to(acc)
        grad_x = grad_w = grad_b = None
        if need_x:
            # sum_j g[b, j] W_E[idx[b, j]]: a weighted bag of k encoder rows per token.
            grad_x = F.embedding_bag(indices, W_E, per_sample_weights=g.to(W_E.dtype), mode="sum").to(x.dtype)
        if need_w:
            # Adam needs a dense [n, d] gradient; G^T x writes only the rows of features selected in the batch.
            grad_w = torch.sparse.mm(_csr_transposed(indices, g, n), x.to(acc)).to(W_E.dtype)
        if need_b:
            grad_b = torch.zeros(n, dtype=acc, device=g.device).index_add_(0, indices.reshape(-1), g.reshape(-1))
            grad_b = grad_b.to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None, None


def topk_encode(
    x: torch.Tensor, W_E: torch.Tensor, b_E: torch.Tensor, k: int, *, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK encoder of paper Section 3.2 (Gao et al. 2024) with a sparse backward.

    pre = x @ W_E.T + b_E [B, n] (the only dense operation, computed in x's dtype in row chunks), the k largest
    pre-activations of each row are kept and passed through ReLU (codes are non-negative).

    Args:
        x: [B, d] activations (float32 or bfloat16; float64 for exactness checks).
        W_E: [n, d] encoder rows (one per feature). b_E: [n] encoder bias.
        k: number of features kept per token, 1 <= k <= n.
        chunk_rows: rows of x per forward chunk (default: a [chunk, n] block of ~128 MB).

    Returns:
        values [B, k] in x's dtype (>= 0) and indices [B, k] int64, ascending within each row. Differentiable with
        respect to x, W_E and b_E; the backward touches only the selected pairs (see the module docstring), and the
        gradient of a selected pair whose pre-activation was <= 0 is zero (ReLU).
    """
    what = "topk_encode"
    _check_2d("x", x, what)
    _check_2d("W_E", W_E, what)
    n, d = W_E.shape
    if x.shape[1] != d:
        raise RanklensError(f"{what}: x has last dimension {x.shape[1]}; expected d_in={d} (W_E is {tuple(W_E.shape)})")
    if not isinstance(b_E, torch.Tensor) or tuple(b_E.shape) != (n,):
        shape = tuple(b_E.shape) if isinstance(b_E, torch.Tensor) else type(b_E).__name__
        raise RanklensError(f"{what}: b_E has shape {shape}; expected [{n}] (one bias per feature)")
    if not x.is_floating_point():
        raise RanklensError(f"{what}: x has dtype {x.dtype}; expected a floating-point tensor")
    _check_k(k, n, what)
    if chunk_rows is None:
        chunk_rows = max(1, _PRE_CHUNK_BYTES // (n * x.element_size()))
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise RanklensError(f"{what}: chunk_rows={chunk_rows!r}; expected a positive int")
    if x.shape[0] == 0:
        return x.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64, device=x.device)
    return _TopKEncode.apply(x.contiguous(), W_E, b_E, k, chunk_rows)


# --------------------------------------------------------------------------- sparse decoder


class _SparseDecode(torch.autograd.Function):
    """x_hat = sum_j values[b, j] W_D[idx[b, j]] + b_D, with a backward over the active pairs only."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, indices: torch.Tensor, W_D: torch.Tensor, b_D: torch.Tensor):  # type: ignore[override]
        v = values if values.dtype == W_D.dtype else values.to(W_D.dtype)
        out = F.embedding_bag(indices, W_D, per_sample_weights=v, mode="sum")
        out = out + (b_D if b_D.dtype == W_D.dtype else b_D.to(W_D.dtype))
        ctx.save_for_backward(values, indices, W_D)
        ctx.b_dtype = b_D.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        values, indices, W_D = ctx.saved_tensors
        need_v, _, need_w, need_b = ctx.needs_input_grad[:4]
        n = W_D.shape[0]
        acc = _acc_dtype(W_D.dtype)
        go = grad_out.to(acc)
        grad_v = grad_w = grad_b = None
        if need_v:
            idx, perm = torch.sort(indices, dim=1)  # CSR needs ascending columns (already so for topk_encode's output)
            # grad_values[b, j] = <grad_out[b], W_D[idx[b, j]]>: the product grad_out @ W_D.T sampled at the pairs.
            w = W_D if W_D.dtype == acc else W_D.to(acc)  # sampled_addmm has no bfloat16 CPU kernel
            # zeros, not empty: sampled_addmm computes beta * mask + ..., and 0 * (garbage NaN) is NaN
            mask = _csr(idx, torch.zeros(idx.shape, dtype=acc, device=idx.device), n)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                sampled = torch.sparse.sampled_addmm(mask, go, w.t(), beta=0.0)
            g_sorted = sampled.values().view(idx.shape)
            grad_v = torch.empty_like(g_sorted).scatter_(1, perm, g_sorted).to(values.dtype)
        if need_w:
            grad_w = torch.sparse.mm(_csr_transposed(indices, values.to(acc), n), go).to(W_D.dtype)
        if need_b:
            grad_b = go.sum(0).to(ctx.b_dtype)
        return grad_v, None, grad_w, grad_b


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, W_D: torch.Tensor, b_D: torch.Tensor
) -> torch.Tensor:
    """Decoder of paper Section 3.2 over the active features only: x_hat[b] = sum_j values[b, j] W_D[indices[b, j]] + b_D.

    Args:
        values: [B, k] code values; indices: [B, k] int64 feature indices, distinct within a row (top-k gives that).
        W_D: [n, d] decoder rows; b_D: [d] decoder bias.

    Returns:
        x_hat [B, d] in W_D's dtype. Differentiable with respect to values, W_D (a dense [n, d] gradient that is zero
        outside the active rows) and b_D; cost O(B k d), independent of n.
    """
    what = "sparse_decode"
    _check_2d("values", values, what)
    _check_2d("indices", indices, what)
    _check_2d("W_D", W_D, what)
    if values.shape != indices.shape:
        raise RanklensError(
            f"{what}: values has shape {tuple(values.shape)} but indices {tuple(indices.shape)}; expected equal [B, k]"
        )
    if indices.dtype not in (torch.int64, torch.int32):
        raise RanklensError(f"{what}: indices have dtype {indices.dtype}; expected torch.int64")
    n, d = W_D.shape
    if not isinstance(b_D, torch.Tensor) or tuple(b_D.shape) != (d,):
        shape = tuple(b_D.shape) if isinstance(b_D, torch.Tensor) else type(b_D).__name__
        raise RanklensError(f"{what}: b_D has shape {shape}; expected [{d}] (d_in of W_D {tuple(W_D.shape)})")
    if values.shape[0] == 0:
        return b_D.to(W_D.dtype).expand(0, d).clone()
    return _SparseDecode.apply(values, indices.to(torch.int64), W_D, b_D)


# --------------------------------------------------------------------------- dense references (for tests)


def dense_topk_code(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Naive TopK code: relu of the k largest entries of each row of pre, scattered into a dense [B, n] tensor.

    Autograd runs through torch.topk and scatter, so this is the reference for ``topk_encode``'s gradients.
    """
    top = torch.topk(pre, k, dim=1)
    return torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))


def dense_topk_sae_reference(
    x: torch.Tensor, W_E: torch.Tensor, b_E: torch.Tensor, W_D: torch.Tensor, b_D: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The TopK SAE of Section 3.2 written out densely: (x_hat [B, d], z [B, n]) with z = TopK(x W_E^T + b_E) and
    x_hat = z W_D + b_D (a [B, n] x [n, d] matmul). Same dtype rules as the kernels (encoder in x's dtype)."""
    pre = x @ W_E.to(x.dtype).t() + b_E.to(x.dtype)
    z = dense_topk_code(pre, k)
    x_hat = z.to(W_D.dtype) @ W_D + b_D.to(W_D.dtype)
    return x_hat, z


# --------------------------------------------------------------------------- BatchTopK


def batch_topk(pre: torch.Tensor, k: int, *, threshold: float | torch.Tensor | None = None) -> torch.Tensor:
    """BatchTopK activation (Bussmann, Leask & Nanda 2024): keep the B*k largest entries of relu(pre) over the whole
    batch [B, n], zero the rest. Returns a DENSE [B, n] code (same dtype as pre), differentiable through pre.

    A token may get more or fewer than k features; the batch total is exactly B*k nonzeros whenever relu(pre) has at
    least B*k positive entries (otherwise all positive entries are kept). Ties at the cut-off are broken by torch.topk.
    The dense form is chosen for simplicity: this activation is not on the paper's TopK hot path.

    Inference: with ``threshold`` given, every entry of relu(pre) strictly above it is kept instead (Bussmann et al.
    replace the batch dependence by a global threshold, estimated during training as the mean over batches of
    ``batch_topk_threshold``), so each token's code no longer depends on its batch.
    """
    what = "batch_topk"
    _check_2d("pre", pre, what)
    B, n = pre.shape
    _check_k(k, n, what)
    acts = torch.relu(pre)
    if threshold is not None:
        return acts * (acts > threshold)
    flat = acts.reshape(-1)
    top = torch.topk(flat, B * k, sorted=False)
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view(B, n)


def batch_topk_threshold(code: torch.Tensor) -> torch.Tensor:
    """Smallest positive entry of a BatchTopK code (a 0-d tensor; +inf if none), Bussmann et al.'s per-batch estimate
    of the inference threshold (average it over training batches)."""
    pos = code[code > 0]
    if pos.numel() == 0:
        return torch.tensor(float("inf"), dtype=code.dtype, device=code.device)
    return pos.min().detach()


# --------------------------------------------------------------------------- JumpReLU (Rajamanoharan et al. 2024)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel K(u) = H(u + 1/2) - H(u - 1/2): 1 for -1/2 < u < 1/2, else 0 (Rajamanoharan et al. 2024)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """JumpReLU_theta(z) = z H(z - theta) with the pseudo-derivative of Rajamanoharan et al. (2024, Eq. 11):
    d/dtheta := -(theta / eps) K((z - theta) / eps); d/dz = H(z - theta) (the ordinary derivative)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = g * (z > theta).to(g.dtype) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            local = -(theta / eps) * rectangle((z - theta) / eps) * g
            grad_theta = _sum_to(local, theta.shape)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """Heaviside H(z - theta) with the pseudo-derivative of Rajamanoharan et al. (2024, Eq. 12):
    d/dtheta := -(1 / eps) K((z - theta) / eps); no gradient to z (their pseudo-code passes 0 to x)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = None
        if ctx.needs_input_grad[1]:
            local = -(1.0 / eps) * rectangle((z - theta) / eps) * g
            grad_theta = _sum_to(local, theta.shape)
        return None, grad_theta, None


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to a parameter's shape (theta [n] against z [..., n])."""
    while t.ndim > len(shape):
        t = t.sum(0)
    return t


def _check_jump(z: torch.Tensor, theta: torch.Tensor, bandwidth: float, what: str) -> None:
    if not isinstance(z, torch.Tensor) or not isinstance(theta, torch.Tensor):
        raise RanklensError(f"{what}: expected tensors z [..., n] and theta [n]")
    if theta.ndim != 1 or z.shape[-1] != theta.shape[0]:
        raise RanklensError(
            f"{what}: theta has shape {tuple(theta.shape)}; expected [{z.shape[-1]}] (one threshold per feature of z)"
        )
    if not (isinstance(bandwidth, int | float) and not isinstance(bandwidth, bool) and bandwidth > 0):
        raise RanklensError(f"{what}: bandwidth={bandwidth!r}; expected a positive number (e.g. 0.001)")


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """JumpReLU activation z * H(z - theta) (Rajamanoharan et al. 2024) with the rectangle-kernel straight-through
    estimator of width ``bandwidth`` for the gradient with respect to theta [n]."""
    _check_jump(z, theta, bandwidth, "jumprelu")
    return _JumpReLU.apply(z, theta, float(bandwidth))


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Heaviside H(z - theta), whose sum over features is the L0 of a JumpReLU code; the rectangle-kernel STE gives
    theta a gradient (Rajamanoharan et al. 2024), z gets none."""
    _check_jump(z, theta, bandwidth, "step")
    return _Step.apply(z, theta, float(bandwidth))
