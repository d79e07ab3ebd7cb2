"""Initializers of sparse autoencoders: the standard one (paper Appendix E.3), Active Subspace Initialization (Section
5.2, Appendix K), the random-subspace baseline (Appendix J.1), the ``auto`` rule for d_init (Appendix J.3, I.1), and
the PCA projection that can be folded into an SAE (Appendix L.1).

Row layout (see ``ranklens.dictionaries.sae``): a feature is a row of W_E and of W_D, both [n_features, d_in]. The
paper's column-convention ``W_E = W_D^T`` is therefore ``W_E = W_D`` here, and its ``W_D <- W_D V V^T`` (decoder rows
[h, d], V [d, d_init]) is literally ``W_D @ V @ V.T`` on the rows.

Typical use::

    init_standard_(sae, x_sample, generator=torch.Generator().manual_seed(0))   # App. E.3
    V = asi_basis(acc, "auto")           # top-d_init right singular vectors of the centered activations (Sec. 5.2)
    init_asi_(sae, V)                    # W_D <- W_D V V^T, W_E = W_D (App. K)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from ranklens.dictionaries.sae import SAEConfig, SparseAutoencoder, _fill_uniform_unit_rows_, _normalize_rows_
from ranklens.errors import RanklensError
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.linalg.basis import (
    PrincipalBasis,
    active_subspace,
    directions_for_variance,
    principal_basis,
    singular_values,
)

__all__ = [
    "AUTO_D_INIT_VARIANCE",
    "NormSearch",
    "PCAProjection",
    "SubspaceInit",
    "asi_basis",
    "default_norm_grid",
    "init_asi_",
    "init_random_subspace_",
    "init_standard_",
    "pca_fold",
    "random_subspace",
    "resolve_d_init",
]

# d_init = the principal directions holding this share of the variance; see resolve_d_init for the evidence.
AUTO_D_INIT_VARIANCE = 0.99
# Rows of x_sample per forward chunk during the norm search: the [chunk, n_features] block stays ~128 MB.
_EVAL_CHUNK_BYTES = 128 << 20
# Decoder rows per float64 chunk of the ASI projection (bounded scratch at a million features).
_PROJECT_CHUNK_BYTES = 64 << 20
# Activations whose code scales linearly with the encoder scale (zero biases): x_hat(s) = s * x_hat(1).
_HOMOGENEOUS = ("topk", "batchtopk", "relu")


class NormSearch(NamedTuple):
    """Result of the decoder-norm grid search (Appendix E.3).

    norm: the chosen row norm r. norms: the grid searched. mse: the initial reconstruction error for each grid value,
    mean over the sample's tokens of ||x - x_hat||^2 (the Section 3.2 loss at step 0). center: the grid's centre
    (the least-squares scale, see ``init_standard_``) or nan when an explicit grid was given.
    """

    norm: float
    norms: list[float]
    mse: list[float]
    center: float


class SubspaceInit(NamedTuple):
    """Result of ``init_asi_`` / ``init_random_subspace_``: the basis V [d_in, d_init] (float64) that was used, and the
    norm search re-run after the projection (None when it was not re-run, the paper's procedure)."""

    basis: torch.Tensor
    norm_search: NormSearch | None


# --------------------------------------------------------------------------- validation


def _check_sae(sae: object, what: str) -> SparseAutoencoder:
    if not isinstance(sae, SparseAutoencoder):
        raise RanklensError(f"{what}: got a {type(sae).__name__}; expected a SparseAutoencoder")
    return sae


def _check_sample(x: object, d: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[-1] != d:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise RanklensError(f"{what}: x_sample has shape {shape}; expected activations [n_tokens, d_in={d}]")
    if not x.is_floating_point():
        raise RanklensError(f"{what}: x_sample has dtype {x.dtype}; expected a floating-point tensor")
    rows = x.reshape(-1, d)
    if rows.shape[0] == 0:
        raise RanklensError(f"{what}: x_sample has no rows; expected at least one token")
    if not bool(torch.isfinite(rows).all()):
        raise RanklensError(f"{what}: x_sample contains NaN or inf; expected finite activations")
    return rows


def _check_basis(basis: object, d: int, what: str) -> torch.Tensor:
    """A [d, m] basis with orthonormal columns (1 <= m <= d), returned in float64.

    Tolerance on max |V^T V - I|: 1e-4, or 1e-2 for a bfloat16/float16 basis (rounding a float64 orthonormal basis to
    bf16 leaves ~1e-3 there, measured at d = 576 and 4096); pass float64 bases for an exact projection.
    """
    if not isinstance(basis, torch.Tensor) or basis.ndim != 2 or basis.shape[0] != d:
        shape = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
        raise RanklensError(f"{what}: basis has shape {shape}; expected [d_in={d}, d_init] (columns = directions)")
    m = basis.shape[1]
    if not 1 <= m <= d:
        raise RanklensError(f"{what}: basis has {m} columns; expected 1 <= d_init <= d_in={d}")
    tol = 1e-2 if basis.dtype in (torch.bfloat16, torch.float16) else 1e-4
    v = basis.detach().to(torch.float64)
    err = float((v.T @ v - torch.eye(m, dtype=torch.float64, device=v.device)).abs().max())
    if not err <= tol:
        raise RanklensError(f"{what}: basis columns are not orthonormal (max |V^T V - I| = {err:.3g}); expected <= {tol}")
    return v


def _check_norms(norms: object, what: str) -> list[float]:
    vals = norms.detach().reshape(-1).tolist() if isinstance(norms, torch.Tensor) else norms
    if isinstance(vals, int | float) or not isinstance(vals, Sequence) or len(vals) == 0:
        raise RanklensError(f"{what}: norms={norms!r}; expected a non-empty sequence of positive numbers")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
            raise RanklensError(f"{what}: norm {v!r} in the grid; expected positive finite numbers")
        out.append(float(v))
    return out


# --------------------------------------------------------------------------- standard init (Appendix E.3)


def default_norm_grid(center: float, n: int = 21, span: float = 10.0) -> list[float]:
    """n values log-spaced from center / span to center * span (21 values from 0.1x to 10x by default; an odd n puts
    the centre itself on the grid)."""
    if not (math.isfinite(center) and center > 0):
        raise RanklensError(f"default_norm_grid: center={center!r}; expected a positive finite number")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RanklensError(f"default_norm_grid: n={n!r}; expected a positive int")
    if not (math.isfinite(span) and span >= 1):
        raise RanklensError(f"default_norm_grid: span={span!r}; expected a finite number >= 1")
    if n == 1:
        return [float(center)]
    exps = torch.linspace(-1.0, 1.0, n, dtype=torch.float64) * math.log10(span)
    return [float(center * 10.0**e) for e in exps]


def _eval_chunk_rows(sae: SparseAutoencoder, x: torch.Tensor, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        return max(1, _EVAL_CHUNK_BYTES // (sae.n_features * x.element_size()))
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise RanklensError(f"chunk_rows={chunk_rows!r}; expected a positive int")
    return chunk_rows


@torch.no_grad()
def _moments(sae: SparseAutoencoder, x: torch.Tensor, chunk: int) -> tuple[float, float, float]:
    """(sum ||r||^2, sum <r, y>, sum ||y||^2) over the sample, float64, with r = x - b_D the part the features must
    carry and y = x_hat - b_D their contribution (b_D is zero unless the caller started it elsewhere)."""
    sxx = sxy = syy = 0.0
    b_dec = sae.b_D.detach().to(torch.float64)
    for i in range(0, x.shape[0], chunk):
        xc = x[i : i + chunk]
        y = sae(xc)[0].to(torch.float64) - b_dec
        x64 = xc.to(torch.float64) - b_dec
        sxx += float((x64 * x64).sum())
        sxy += float((x64 * y).sum())
        syy += float((y * y).sum())
    return sxx, sxy, syy


@torch.no_grad()
def _norm_search(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    norms: Sequence[float] | torch.Tensor | None,
    chunk_rows: int | None,
) -> NormSearch:
    """Grid search of the common row norm r minimizing the initial MSE (Appendix E.3). On entry W_D holds unit rows,
    b_E is zero and b_D is zero or a given start (the data mean); on exit the rows are at the best r: W_E = W_D = r * unit (tied, the paper's init), or,
    with normalize_decoder, W_D = unit and W_E = r * unit (the encoder is then the only place the scale can live).

    Nothing is copied: with b_E = 0 the decoder's feature part is linear, so x_hat(r) - b_D = dec(r) * y(r) with y(r) the output for
    encoder rows at norm r and unit decoder rows, dec(r) = r (tied) or 1. For topk, batchtopk and relu the code is
    moreover positively homogeneous in the encoder scale, y(r) = r * y(1), so every grid value's MSE is the exact
    quadratic (sum||x'||^2 - 2 s sum<x',y> + s^2 sum||y||^2) / N, x' = x - b_D, s = r * dec(r), from ONE forward pass. JumpReLU's
    threshold breaks that homogeneity, so each grid value gets its own forward pass.
    """
    n_tok = x.shape[0]
    chunk = _eval_chunk_rows(sae, x, chunk_rows)
    tied = not sae.config.normalize_decoder
    unit = sae.W_D
    sae.W_E.copy_(unit)
    sxx, sxy, syy = _moments(sae, x, chunk)
    # Least-squares scale of y(1) onto x: the minimizer over s of ||x - s y||^2, and the grid's centre.
    c = sxy / syy if syy > 0 and sxy > 0 else 1.0
    center = math.sqrt(c) if tied else c
    grid = default_norm_grid(center) if norms is None else _check_norms(norms, "norm search")

    def dec(r: float) -> float:
        return r if tied else 1.0

    if sae.config.activation in _HOMOGENEOUS:
        mse = [(sxx - 2 * r * dec(r) * sxy + (r * dec(r)) ** 2 * syy) / n_tok for r in grid]
    else:
        mse = []
        for r in grid:
            sae.W_E.copy_(unit).mul_(r)
            exx, exy, eyy = _moments(sae, x, chunk)
            mse.append((exx - 2 * dec(r) * exy + dec(r) ** 2 * eyy) / n_tok)
    best = min(range(len(grid)), key=lambda i: (mse[i], i))
    r = grid[best]
    if tied:
        sae.W_D.mul_(r)
        sae.W_E.copy_(sae.W_D)  # W_E = W_D^T in the paper's column convention
    else:
        sae.W_E.copy_(sae.W_D).mul_(r)
    return NormSearch(r, grid, mse, center if norms is None else float("nan"))


def init_standard_(
    sae: SparseAutoencoder,
    x_sample: torch.Tensor,
    norms: Sequence[float] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    b_dec: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> NormSearch:
    """The standard initialization of Appendix E.3, in place; returns the norm search.

    ``b_dec`` [d_in] starts the decoder bias there instead of at zero (e.g. the data mean, ``b_dec_init: mean`` of
    ``ranklens train sae``); the norm search then fits the features' part x - b_D.

    Decoder rows are drawn from U(-1, 1)^d_in and scaled to a common norm r, W_E = W_D (the paper's W_E = W_D^T in
    its column convention), b_E = b_D = 0 (and theta = jumprelu_init_threshold for JumpReLU). r minimizes the initial
    reconstruction MSE on ``x_sample`` [n_tokens, d_in] over a grid:

    - ``norms`` given: that grid (absolute row norms).
    - ``norms=None``: 21 values log-spaced from 0.1x to 10x a data-derived centre r0, the row norm at which the
      least-squares rescaling of the unit-norm SAE's reconstruction fits x best (r0^2 = <x, y> / <y, y>, y = x_hat at
      r = 1). Why this centre: with zero biases x_hat scales exactly as r^2 for topk/batchtopk/relu, so the best r
      depends on d_in, k, n_features and the data's spectrum (a dense ReLU code wants a far smaller r than a TopK
      code with small k) and no fixed range fits every SAE; r0 is the exact optimum for those activations and the grid's centre, and the grid's two
      decades around it are where JumpReLU's threshold (which breaks the homogeneity) can move the optimum.

    With ``normalize_decoder`` the decoder rows stay at unit norm and the searched r is the encoder rows' norm
    (W_E = r W_D): the only place the scale can live under that constraint.

    Deterministic given ``generator`` (rows are drawn on the CPU in float64, then cast and moved).
    """
    what = "init_standard_"
    sae = _check_sae(sae, what)
    x = _check_sample(x_sample, sae.d_in, what)
    with torch.no_grad():
        _fill_uniform_unit_rows_(sae.W_D.data, generator)
        sae.b_E.zero_()
        sae.b_D.zero_()
        if b_dec is not None:
            sae.b_D.copy_(b_dec.to(sae.b_D))
        if sae.log_threshold is not None:
            sae.log_threshold.fill_(math.log(sae.config.jumprelu_init_threshold))
    return _norm_search(sae, x, norms, chunk_rows)


# --------------------------------------------------------------------------- ASI (Section 5.2, Appendix K)


@torch.no_grad()
def _project_rows_(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w <- (w @ V) @ V.T in place, computed in float64 row chunk by row chunk (W_D V V^T without a float64 copy of
    all of W_D)."""
    v = v.to(w.device)
    step = max(1, _PROJECT_CHUNK_BYTES // (8 * w.shape[1]))
    for i in range(0, w.shape[0], step):
        w[i : i + step] = ((w[i : i + step].to(torch.float64) @ v) @ v.T).to(w.dtype)
    return w


def _rms_row_norm(w: torch.Tensor) -> float:
    """sqrt(mean_i ||w_i||^2), accumulated in float64 chunk by chunk."""
    step = max(1, _PROJECT_CHUNK_BYTES // (8 * w.shape[1]))
    total = sum(float((w[i : i + step].to(torch.float64) ** 2).sum()) for i in range(0, w.shape[0], step))
    return math.sqrt(total / w.shape[0])


def init_asi_(
    sae: SparseAutoencoder,
    basis: torch.Tensor,
    *,
    x_sample: torch.Tensor | None = None,
    norms: Sequence[float] | torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> SubspaceInit:
    """Active Subspace Initialization (Section 5.2, Appendix K), in place, after ``init_standard_``.

    ``basis`` V [d_in, d_init] has orthonormal columns: the top-d_init right singular vectors of the mean-centered
    activations (``asi_basis``; ``ranklens.spectrum.stats.active_subspace`` of an accumulator over many tokens, not
    one batch). Exactly the paper: W_D <- W_D V V^T (every decoder row projected onto span(V)), then W_E = W_D. Biases
    and JumpReLU thresholds are left as they are.

    Norms. Appendix K projects a decoder that was "initialized uniformly" with the Appendix E.3 norm and does not
    rescale, so by default the norm search is NOT re-run: the projected rows keep norms of about r sqrt(d_init / d_in)
    (varying from row to row), which is the paper's procedure (E.3 also reports that the initial norm has little
    impact within a reasonable range). Pass ``x_sample`` to re-run the search after the projection instead: every
    projected row is then rescaled to one common norm chosen for the lowest initial MSE (``norms`` as in
    ``init_standard_``), which undoes the shrinkage. With ``normalize_decoder`` the projected decoder rows are put back
    at unit norm either way (the constraint the trainer enforces), and W_E = s W_D keeps the encoder scale s found
    before (or found again by the re-run search).

    ``d_init = d_in`` leaves the weights unchanged (V V^T = I, footnote 7: "equivalent to not using ASI").
    """
    what = "init_asi_"
    sae = _check_sae(sae, what)
    v = _check_basis(basis, sae.d_in, what)
    x = None if x_sample is None else _check_sample(x_sample, sae.d_in, what)
    if x is None and norms is not None:
        raise RanklensError(f"{what}: norms={norms!r} given without x_sample; the norm search needs x_sample")
    with torch.no_grad():
        # The encoder scale before the projection (W_E = s W_D after init_standard_; s = 1 when tied).
        enc_rms = _rms_row_norm(sae.W_E.detach())
        _project_rows_(sae.W_D.data, v)
        if x is not None:
            _normalize_rows_(sae.W_D.data)
            return SubspaceInit(v, _norm_search(sae, x, norms, chunk_rows))
        if sae.config.normalize_decoder:
            _normalize_rows_(sae.W_D.data)
            sae.W_E.copy_(sae.W_D).mul_(enc_rms)
        else:
            sae.W_E.copy_(sae.W_D)  # W_E = W_D^T in the paper's column convention
    return SubspaceInit(v, None)


def random_subspace(d: int, d_init: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random d_init-dimensional subspace of R^d: Q of the QR decomposition of a Gaussian [d, d_init]
    matrix, columns' signs fixed by R's diagonal (so Q is Haar-distributed), float64 on the CPU."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise RanklensError(f"random_subspace: d={d!r}; expected a positive int")
    if isinstance(d_init, bool) or not isinstance(d_init, int) or not 1 <= d_init <= d:
        raise RanklensError(f"random_subspace: d_init={d_init!r}; expected an int with 1 <= d_init <= d={d}")
    g = torch.randn(d, d_init, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs


def init_random_subspace_(
    sae: SparseAutoencoder,
    d_in: int,
    d_init: int,
    generator: torch.Generator | None = None,
    *,
    x_sample: torch.Tensor | None = None,
    norms: Sequence[float] | torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> SubspaceInit:
    """The random-subspace baseline of Appendix J.1, in place: ASI (``init_asi_``, same options) with V a uniformly
    random orthonormal [d_in, d_init] basis instead of the active subspace."""
    sae = _check_sae(sae, "init_random_subspace_")
    if d_in != sae.d_in:
        raise RanklensError(f"init_random_subspace_: d_in={d_in!r}; expected the SAE's d_in={sae.d_in}")
    v = random_subspace(d_in, d_init, generator)
    return init_asi_(sae, v, x_sample=x_sample, norms=norms, chunk_rows=chunk_rows)


# --------------------------------------------------------------------------- d_init (Appendix J.3, I.1)


def _spectrum(source: object, what: str) -> torch.Tensor:
    if isinstance(source, CovarianceAccumulator):
        return singular_values(source)
    if isinstance(source, PrincipalBasis):
        return source.singular_values
    if isinstance(source, torch.Tensor | Sequence) and not isinstance(source, str):
        t = torch.as_tensor(source, dtype=torch.float64)
        if t.ndim != 1 or t.numel() == 0:
            raise RanklensError(f"{what}: singular values have shape {tuple(t.shape)}; expected a non-empty 1-D vector")
        return t
    raise RanklensError(
        f"{what}: got a {type(source).__name__}; expected a CovarianceAccumulator, a PrincipalBasis or singular values"
    )


def resolve_d_init(
    spec: int | Literal["auto"],
    source: CovarianceAccumulator | PrincipalBasis | torch.Tensor | Sequence[float] | None = None,
    d: int | None = None,
) -> int:
    """The ASI subspace dimension d_init from a spec: an int in [1, d], or "auto".

    ``source`` (an accumulator of the site's activations, its ``PrincipalBasis``, or its singular values) gives the
    spectrum for "auto" and d when ``d`` is not given.

    The "auto" rule: d_init = the smallest number of principal directions of the layer's own centered activations
    whose variance (s_i^2) reaches 99% of the total, clamped to [1, d]. It replaced round(0.3 * erank) (chosen from
    the paper's numbers alone: 0.3 x 2506 = 752, near App. E.1's 768) after that rule gave 87 of 576 dimensions on
    SmolLM2-135M L15.attn_out and left twice TopK's dead features. The evidence (docs/results/d_init_rule.md,
    ``scripts/d_init_evidence.py``: 8x SAEs, k = 50, 1M tokens, 2 seeds, d_init from 0.125 d to 0.75 d, the rule
    itself and the standard init on SmolLM2 L3 and L15 attn_out and MiniLM L3 attn_out, erank 318, 291 and 191):

    - FVU falls monotonically as d_init grows on every site, towards the standard init's (footnote 7: d_init = d
      is the standard init); only 0.75 d on L3 edges below it (0.0985 against 0.0990). FVU alone would pick d.
    - Dead features: on both SmolLM2 sites ASI's fewest sit at about half of d (L15: 930 trained-dead at 288 against
      990 for the standard init, held-out dead 1,188 against 1,344; L3: held-out dead 70 against 148) and climb
      steeply below it (App. J.3: features crowd into too small a subspace). The 99% level lands there (276 and 310
      directions). On MiniLM it does not: dead counts fall all the way to d (159 at the rule's 186, 101 at 288, 87
      for the standard init), so there the rule costs dead features; no spectral level we measured lands near the
      best d_init on all three sites (99.9%, 409 / 436 / 270, would fit MiniLM and lose SmolLM2 L15's gain).
    - The level follows each site's own spectrum and says what the subspace holds; the effective rank lands close by
      (291, 318, 191) but is a spectral entropy, not a statement about variance kept.

    Errors (RanklensError): a spec that is not an int or "auto", an int outside [1, d], "auto" without a spectrum.
    """
    what = "resolve_d_init"
    s = None if source is None else _spectrum(source, what)
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
        raise RanklensError(f"{what}: d={d!r}; expected a positive int (the activation dimension)")
    if d is not None and s is not None and s.numel() != d:
        raise RanklensError(f"{what}: the spectrum has {s.numel()} singular values but d={d}; expected them equal")
    dim = d if d is not None else (None if s is None else int(s.numel()))
    if isinstance(spec, str):
        if spec != "auto":
            raise RanklensError(f"{what}: d_init={spec!r}; expected an int in [1, d] or 'auto'")
        if s is None or dim is None:
            raise RanklensError(f"{what}: d_init='auto' needs the spectrum (an accumulator or singular values); got none")
        return int(min(dim, max(1, directions_for_variance(s, AUTO_D_INIT_VARIANCE))))
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise RanklensError(f"{what}: d_init={spec!r}; expected an int in [1, d] or 'auto'")
    if dim is None:
        raise RanklensError(f"{what}: d_init={spec} cannot be checked without d; pass d or the spectrum")
    if not 1 <= spec <= dim:
        raise RanklensError(f"{what}: d_init={spec}; expected 1 <= d_init <= d={dim}")
    return spec


def asi_basis(source: CovarianceAccumulator | PrincipalBasis, d_init: int | Literal["auto"] = "auto") -> torch.Tensor:
    """V_active = V[:, :d_init] (Section 5.2): the top-d_init right singular vectors of the centered activations,
    [d, d_init] float64, from an accumulator over many tokens (or its PrincipalBasis); d_init as in resolve_d_init."""
    if not isinstance(source, CovarianceAccumulator | PrincipalBasis):
        raise RanklensError(
            f"asi_basis: got a {type(source).__name__}; expected a CovarianceAccumulator or a PrincipalBasis"
        )
    pb = source if isinstance(source, PrincipalBasis) else principal_basis(source)
    m = resolve_d_init(d_init, pb)
    return active_subspace(pb, m)


# --------------------------------------------------------------------------- PCA fold (Appendix L.1)


class PCAProjection:
    """The PCA projection y = (x - mean) V of Appendix L.1 (V = basis [d, d_pca], orthonormal columns).

    For JumpReLU with an L0 that starts high and decreases (Appendix E.4), L.1 recommends training the SAE on the
    PCA-reduced data first, then folding the projection into the SAE (``fold_into``) and continuing in the original
    space. ``from_accumulator`` takes mean and V from an accumulator of the activations.
    """

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor) -> None:
        if not isinstance(mean, torch.Tensor) or mean.ndim != 1:
            shape = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
            raise RanklensError(f"PCAProjection: mean has shape {shape}; expected a vector [d]")
        self.basis = _check_basis(basis, mean.shape[0], "PCAProjection")  # [d, d_pca] float64
        self.mean = mean.detach().to(device=self.basis.device, dtype=torch.float64)  # [d]

    @classmethod
    def from_accumulator(cls, acc: CovarianceAccumulator, d_pca: int) -> PCAProjection:
        if not isinstance(acc, CovarianceAccumulator):
            raise RanklensError(f"PCAProjection.from_accumulator: got a {type(acc).__name__}; expected an accumulator")
        return cls(acc.mean, active_subspace(acc, d_pca))

    @property
    def d(self) -> int:
        return int(self.basis.shape[0])

    @property
    def d_pca(self) -> int:
        return int(self.basis.shape[1])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) V, [..., d_pca] in x's dtype."""
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != self.d:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise RanklensError(f"PCAProjection.project: x has shape {shape}; expected [..., d={self.d}]")
        return (x - self.mean.to(x.dtype)) @ self.basis.to(x.dtype)

    def unproject(self, y: torch.Tensor) -> torch.Tensor:
        """mean + y V^T, [..., d] in y's dtype: a reconstruction in the PCA space mapped back."""
        if not isinstance(y, torch.Tensor) or y.ndim < 1 or y.shape[-1] != self.d_pca:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise RanklensError(f"PCAProjection.unproject: y has shape {shape}; expected [..., d_pca={self.d_pca}]")
        return self.mean.to(y.dtype) + y @ self.basis.to(y.dtype).T

    @torch.no_grad()
    def fold_into(self, sae_small: SparseAutoencoder) -> SparseAutoencoder:
        """A new SAE over the original d whose codes on x equal ``sae_small``'s codes on project(x), and whose
        reconstruction equals unproject(sae_small's reconstruction) (Appendix L.1).

        Algebra (rows; small SAE: pre = W_Es y + b_Es, y_hat = f W_Ds + b_Ds, with y = (x - m) V):
            pre   = W_Es V^T (x - m) + b_Es          =>  W_E = W_Es V^T,  b_E = b_Es - W_E m
            x_hat = m + y_hat V^T = f W_Ds V^T + (m + b_Ds V^T)  =>  W_D = W_Ds V^T,  b_D = m + V b_Ds
        With apply_b_dec_to_input the small SAE encodes W_Es (y - b_Ds) + b_Es, and W_E (x - b_D) = W_Es V^T (x - m -
        V b_Ds) = W_Es (y - b_Ds) since V^T V = I, so b_E = b_Es. Row norms are preserved (V has orthonormal columns),
        so a unit-norm decoder stays unit-norm; JumpReLU thresholds are copied. Computed in float64, stored in the
        small SAE's dtype.
        """
        if not isinstance(sae_small, SparseAutoencoder):
            raise RanklensError(f"fold_into: got a {type(sae_small).__name__}; expected a SparseAutoencoder")
        if sae_small.d_in != self.d_pca:
            raise RanklensError(f"fold_into: the SAE has d_in={sae_small.d_in}; expected d_pca={self.d_pca}")
        cfg: SAEConfig = sae_small.config.model_copy(update={"d_in": self.d})
        dev = sae_small.W_D.device
        big = SparseAutoencoder(cfg, device=dev)
        v = self.basis.to(dev)
        m = self.mean.to(dev)
        w_e = sae_small.W_E.detach().to(torch.float64) @ v.T  # [n, d]
        w_d = sae_small.W_D.detach().to(torch.float64) @ v.T  # [n, d]
        b_es = sae_small.b_E.detach().to(torch.float64)
        b_e = b_es if cfg.apply_b_dec_to_input else b_es - w_e @ m
        b_d = m + v @ sae_small.b_D.detach().to(torch.float64)
        for p, val in ((big.W_E, w_e), (big.W_D, w_d), (big.b_E, b_e), (big.b_D, b_d)):
            p.copy_(val.to(p.dtype))
        if sae_small.log_threshold is not None:
            big.log_threshold.copy_(sae_small.log_threshold.detach())
        return big


def pca_fold(sae_small: SparseAutoencoder, basis: torch.Tensor, mean: torch.Tensor) -> SparseAutoencoder:
    """``PCAProjection(mean, basis).fold_into(sae_small)``: the Appendix L.1 fold as one call."""
    return PCAProjection(mean, basis).fold_into(sae_small)
