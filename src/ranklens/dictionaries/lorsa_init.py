"""Initializers for Lorsa (``ranklens.dictionaries.lorsa``), and its exact decomposition of an MHSA layer.

- ``init_default_``: the random initialization of the dimensional-collapse paper, Appendix O.2.
- ``init_qk_from_mhsa_``: copy the target's Q/K weights into the QK groups (Lorsa paper Appendix B.3, trainable or
  frozen; dimensional-collapse paper Section 5.4: "we initialize each group's Q/K weights from the MHSA Q/K
  parameters").
- ``init_asi_``: Active Subspace Initialization for Lorsa (dimensional-collapse paper Section 5.4 and the "Use on
  Lorsa" pseudo-code of Appendix K), with the per-head subspaces from a streaming covariance.
- ``exact_from_mhsa``: a Lorsa that reproduces the MHSA exactly (a construction, not a paper algorithm): the check
  that Lorsa's attention, positions and masks are the target's.

Layouts. ``MHSAWeights`` holds W_V [n_kv_heads, d_head, d] and W_O [d, n_heads * d_head] (Linear layout). The
pseudo-code of Appendix K uses TransformerLens layouts, ``mhsa.W_V[i]: [d, h]`` and ``mhsa.W_O[i]: [h, d]``; here
``mhsa.W_V[i] = W_V[kv_group(i)].T`` ([d, d_head]; GQA heads read their KV group's values) and
``mhsa.W_O[i] = W_O_head(i).T = W_O[:, i*d_head:(i+1)*d_head].T`` ([d_head, d]).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Literal

import torch

from ranklens.dictionaries.lorsa import Lorsa, LorsaConfig
from ranklens.errors import RanklensError
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.lm.attention import MHSAWeights

__all__ = [
    "exact_from_mhsa",
    "head_value_subspaces",
    "init_asi_",
    "init_default_",
    "init_qk_from_mhsa_",
    "qk_source_heads",
]

Assignment = Literal["block", "cyclic"]


def _check_lorsa(lorsa: Lorsa) -> None:
    if not isinstance(lorsa, Lorsa):
        raise RanklensError(f"expected a Lorsa module, got {type(lorsa).__name__}")


def _check_pair(lorsa: Lorsa, w: MHSAWeights) -> None:
    _check_lorsa(lorsa)
    if not isinstance(w, MHSAWeights):
        raise RanklensError(
            f"expected MHSAWeights (from ranklens.lm.attention.mhsa_weights), got {type(w).__name__}"
        )
    if w.d_model != lorsa.cfg.d_model:
        raise RanklensError(
            f"Lorsa d_model {lorsa.cfg.d_model} does not match the MHSA's d_model {w.d_model}; expected equal"
        )


# --------------------------------------------------------------------------------------------------------------------
# Appendix O.2: random initialization
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_default_(lorsa: Lorsa, generator: torch.Generator | None = None) -> Lorsa:
    """Dimensional-collapse paper, Appendix O.2: "We initialize W_Q and W_K using Xavier uniform initialization. The
    value matrix W_V is initialized from N(0, 1/sqrt(d_sae)), while the output matrix W_O is initialized from
    N(0, 1/sqrt(d_model)). All bias terms are initialized to zero."

    Interpretations (as in the authors' llamascopium code): the second argument of N(., .) is the standard deviation,
    so W_V ~ N(0, std = 1/sqrt(H)) with d_sae = H the number of Lorsa heads, and W_O ~ N(0, std = 1/sqrt(d_model)).
    Xavier-uniform is applied to each group's map d -> d_qk as a 2-D matrix, U(-a, a) with
    a = sqrt(6 / (d_model + d_qk)) (``xavier_uniform_`` on the whole [G, d_qk, d] tensor would instead take fans
    from the group axis, which is not a layer dimension). q/k norm weights (if any) are set to one."""
    _check_lorsa(lorsa)
    c = lorsa.cfg
    bound = math.sqrt(6.0 / (c.d_model + c.d_qk))
    lorsa.W_Q.uniform_(-bound, bound, generator=generator)
    lorsa.W_K.uniform_(-bound, bound, generator=generator)
    lorsa.W_V.normal_(0.0, 1.0 / math.sqrt(c.n_heads), generator=generator)
    lorsa.W_O.normal_(0.0, 1.0 / math.sqrt(c.d_model), generator=generator)
    for b in (lorsa.b_Q, lorsa.b_K, lorsa.b_V, lorsa.b_O):
        if b is not None:
            b.zero_()
    if lorsa.q_norm_weight is not None:
        lorsa.q_norm_weight.fill_(1.0)
        lorsa.k_norm_weight.fill_(1.0)
    return lorsa


# --------------------------------------------------------------------------------------------------------------------
# Appendix B.3 (Lorsa paper): QK from the MHSA
# --------------------------------------------------------------------------------------------------------------------


def qk_source_heads(n_qk_groups: int, n_mhsa_heads: int, assignment: Assignment = "block") -> torch.Tensor:
    """Which MHSA query head each Lorsa QK group copies, int64 [G].

    "block": group g copies head g * n_heads // G, i.e. consecutive groups share a head (G = 8 n_heads in App. O.1:
    groups 0-7 copy head 0, ...). Lorsa head h is in group h // (H/G), so with H and G multiples of n_heads the
    heads copying MHSA head i are exactly ASI's block i (App. K: heads [i*rate, (i+1)*rate), rate = H // n_heads);
    this is also the authors' code (``repeat_interleave`` of the MHSA Q/K). "cyclic": group g copies head
    g mod n_heads."""
    if assignment == "block":
        return torch.arange(n_qk_groups) * n_mhsa_heads // n_qk_groups
    if assignment == "cyclic":
        return torch.arange(n_qk_groups) % n_mhsa_heads
    raise RanklensError(f"QK assignment {assignment!r}: expected 'block' or 'cyclic'")


def _warn_scheme(lorsa: Lorsa, w: MHSAWeights) -> None:
    c = lorsa.cfg
    lr = None if c.positions is None else c.positions.rotary_dim
    wr = None if w.positions is None else w.positions.rotary_dim
    if lr != wr:
        warnings.warn(
            f"Lorsa rotary_dim {lr} differs from the MHSA's {wr}: the copied Q/K will not compute the MHSA's "
            "patterns (build the config with LorsaConfig.from_mhsa)",
            RuntimeWarning,
            stacklevel=3,
        )
    if (w.q_norm is not None) != c.qk_norm:
        warnings.warn(
            f"Lorsa qk_norm={c.qk_norm} but the MHSA {'has' if w.q_norm is not None else 'has no'} q/k norms: the "
            "copied Q/K will not compute the MHSA's patterns",
            RuntimeWarning,
            stacklevel=3,
        )


@torch.no_grad()
def init_qk_from_mhsa_(
    lorsa: Lorsa, w: MHSAWeights, trainable: bool = True, assignment: Assignment = "block"
) -> Lorsa:
    """Initialize every QK group from an MHSA query head (Lorsa paper Appendix B.3; used by ASI, Section 5.4).

    Group g gets W_Q, b_Q of head ``qk_source_heads(G, n_heads, assignment)[g]`` and W_K, b_K of that head's KV group
    (GQA: the shared key is copied into each group), zero biases where the model has none, and the q/k norm weights
    if both have q/k norms. ``trainable=False`` freezes them (requires_grad False; App. B.3's "fixed" setting, which
    the paper finds worse: FVU 12.4% vs 11.2%). Needs d_qk == d_head; warns when G < n_heads (App. B hard constraint:
    "the number of QK pairs must not be fewer than the number of attention heads")."""
    _check_pair(lorsa, w)
    c = lorsa.cfg
    if c.d_qk != w.d_head:
        raise RanklensError(
            f"Lorsa d_qk {c.d_qk} differs from the MHSA's d_head {w.d_head}; expected equal to copy Q/K"
        )
    if c.n_qk_groups < w.n_heads:
        warnings.warn(
            f"Lorsa has {c.n_qk_groups} QK groups, fewer than the MHSA's {w.n_heads} heads (Lorsa App. B: a hard "
            f"constraint); only {c.n_qk_groups} heads' Q/K are copied",
            RuntimeWarning,
            stacklevel=2,
        )
    _warn_scheme(lorsa, w)
    src = qk_source_heads(c.n_qk_groups, w.n_heads, assignment)
    kv = src // w.group_size
    dt, dev = lorsa.W_Q.dtype, lorsa.W_Q.device
    lorsa.W_Q.copy_(w.W_Q[src].to(dev, dt))
    lorsa.W_K.copy_(w.W_K[kv].to(dev, dt))
    lorsa.b_Q.copy_(w.b_Q[src].to(dev, dt) if w.b_Q is not None else torch.zeros_like(lorsa.b_Q))
    lorsa.b_K.copy_(w.b_K[kv].to(dev, dt) if w.b_K is not None else torch.zeros_like(lorsa.b_K))
    params = [lorsa.W_Q, lorsa.b_Q, lorsa.W_K, lorsa.b_K]
    if c.qk_norm and w.q_norm is not None:
        lorsa.q_norm_weight.copy_(
            (w.q_norm.weight + w.q_norm.offset).to(dev, dt).expand_as(lorsa.q_norm_weight)
        )
        lorsa.k_norm_weight.copy_(
            (w.k_norm.weight + w.k_norm.offset).to(dev, dt).expand_as(lorsa.k_norm_weight)
        )
        params += [lorsa.q_norm_weight, lorsa.k_norm_weight]
    for p in params:
        p.requires_grad_(bool(trainable))
    return lorsa


# --------------------------------------------------------------------------------------------------------------------
# Appendix K (dimensional-collapse paper): ASI for Lorsa
# --------------------------------------------------------------------------------------------------------------------


def _canonical_signs(P: torch.Tensor) -> torch.Tensor:
    """Flip each column of P [d, r] so that its largest-magnitude entry is positive (singular vectors are defined up
    to sign; this makes the result independent of the eigen/SVD routine)."""
    idx = P.abs().argmax(dim=0)
    signs = torch.sign(P.gather(0, idx[None]))[0]
    signs[signs == 0] = 1
    return P * signs


def _input_covariance(captured_inputs, d: int) -> CovarianceAccumulator:
    if isinstance(captured_inputs, CovarianceAccumulator):
        acc = captured_inputs
    else:
        acc = CovarianceAccumulator(d)
        batches = [captured_inputs] if isinstance(captured_inputs, torch.Tensor) else captured_inputs
        if not isinstance(batches, Iterable):
            raise RanklensError(
                f"captured_inputs of type {type(captured_inputs).__name__}: expected a tensor [N, d], an iterable of "
                "such tensors, or a CovarianceAccumulator"
            )
        for x in batches:
            acc.update(x.detach())
    if acc.d != d:
        raise RanklensError(f"captured inputs have dimension {acc.d}; expected the MHSA's d_model {d}")
    if acc.n < 2:
        raise RanklensError(
            f"captured inputs hold {acc.n} row(s); expected at least 2 tokens (many, in practice)"
        )
    return acc


def head_value_subspaces(w: MHSAWeights, captured_inputs, d_init: int) -> torch.Tensor:
    """Top-d_init principal directions of each head's captured values, float64 [n_heads, d, d_init]
    (Appendix K, "Use on Lorsa", steps 1-3.4).

    The pseudo-code builds captured_v_i = X W_V,i W_V,i^T ([N, d]: the head's values mapped back to d-space),
    demeans it and takes the top left singular vectors U[:, :d_init] of its transpose. Those are the top
    eigenvectors of cov(captured_v_i) = M_i Sigma M_i, with M_i = W_V,i W_V,i^T [d, d] and Sigma the covariance of X;
    so one streaming float64 covariance of the inputs (``CovarianceAccumulator``, mergeable across shards) serves every
    head, with no [N, d] matrix. Heads of one GQA group share their subspace. Columns are sorted by decreasing
    variance, signs canonicalized (largest entry positive).

    captured_inputs: the attention inputs (site attn_in) at non-special positions, as a tensor [N, d] (or [..., d]),
    an iterable of such tensors, or a filled CovarianceAccumulator."""
    d = w.d_model
    if isinstance(d_init, bool) or not isinstance(d_init, int) or not 1 <= d_init <= d:
        raise RanklensError(f"d_init={d_init!r}: expected an int in 1..d_model={d}")
    if d_init > w.d_head:
        warnings.warn(
            f"d_init {d_init} exceeds d_head {w.d_head}: a head's captured values span at most d_head directions, "
            "the rest are arbitrary null-space directions",
            RuntimeWarning,
            stacklevel=2,
        )
    sigma = _input_covariance(captured_inputs, d).covariance().cpu()  # [d, d] float64
    out = torch.empty(w.n_heads, d, d_init, dtype=torch.float64)
    cache: dict[int, torch.Tensor] = {}
    for i in range(w.n_heads):
        g = w.kv_group(i)
        if g not in cache:
            Wv = w.W_V[g].detach().cpu().to(torch.float64)  # [dh, d]; mhsa.W_V[i] = Wv.T
            M = Wv.T @ Wv  # [d, d]
            C = M @ sigma @ M
            C = (C + C.T) / 2
            _, vecs = torch.linalg.eigh(C)  # ascending
            cache[g] = _canonical_signs(vecs.flip(-1)[:, :d_init])
        out[i] = cache[g]
    return out


@torch.no_grad()
def init_asi_(
    lorsa: Lorsa,
    w: MHSAWeights,
    captured_inputs,
    d_init: int | None = None,
    *,
    copy_qk: bool = True,
    qk_trainable: bool = True,
) -> Lorsa:
    """Active Subspace Initialization of Lorsa (dimensional-collapse paper Section 5.4; Appendix K, "Use on Lorsa").

    Call after a random init (``init_default_``): the random entries W_V[:, :d_init] seed the new rows. With
    rate = H // n_heads, MHSA head i owns Lorsa heads [i*rate, (i+1)*rate) ("we partition Lorsa heads into such
    groups, matching the number of attention heads in the MHSA"), and with P_i [d, d_init] its value subspace
    (``head_value_subspaces``; d_init defaults to d_qk, as the pseudo-code, = d_head per App. O.1)::

        W_V[block_i] = W_V[block_i, :d_init] @ P_i^T                                  [rate, d]   (step 3.5)
        W_O[block_i] = W_V[block_i] @ mhsa.W_V[i] @ mhsa.W_O[i]                       [rate, d]   (step 3.6)
                     = W_V[block_i] @ W_V[kv_group(i)].T @ W_O_head(i).T              (OV circuit of head i)
        W_V, W_O <- rows / row norms                                                              (step 4)

    W_O uses the un-normalized new W_V (as the pseudo-code), so each head's output direction is what head i writes
    for its value direction (a "typed" init). Heads past n_heads * rate (when n_heads does not divide H) keep their
    random rows, normalized like the rest. Biases are untouched. With ``copy_qk`` the QK groups are initialized from
    the MHSA (``init_qk_from_mhsa_`` with the "block" assignment, so a group's heads and its Q/K come from the same
    MHSA head when G is a multiple of n_heads)."""
    _check_pair(lorsa, w)
    c = lorsa.cfg
    if c.n_heads < w.n_heads:
        raise RanklensError(
            f"Lorsa has {c.n_heads} heads, fewer than the MHSA's {w.n_heads}; expected at least one per MHSA head"
        )
    d_init = c.d_qk if d_init is None else d_init
    if isinstance(d_init, bool) or not isinstance(d_init, int) or not 1 <= d_init <= c.d_model:
        raise RanklensError(f"d_init={d_init!r}: expected an int in 1..d_model={c.d_model}")
    if copy_qk and c.n_qk_groups % w.n_heads:
        warnings.warn(
            f"n_qk_groups {c.n_qk_groups} is not a multiple of the MHSA's {w.n_heads} heads: some QK groups hold "
            "heads initialized from different MHSA heads",
            RuntimeWarning,
            stacklevel=2,
        )
    P = head_value_subspaces(w, captured_inputs, d_init)  # [n, d, d_init] float64
    rate = c.n_heads // w.n_heads
    W_V = lorsa.W_V.detach().to(torch.float64).cpu().clone()
    W_O = lorsa.W_O.detach().to(torch.float64).cpu().clone()
    for i in range(w.n_heads):
        sl = slice(rate * i, rate * (i + 1))
        Wv = w.W_V[w.kv_group(i)].detach().cpu().to(torch.float64)  # [dh, d]
        Wo = w.W_O_head(i).detach().cpu().to(torch.float64)  # [d, dh]
        W_V[sl] = W_V[sl, :d_init] @ P[i].T
        W_O[sl] = W_V[sl] @ Wv.T @ Wo.T
    W_V = W_V / W_V.norm(dim=1, keepdim=True).clamp_min(1e-30)
    W_O = W_O / W_O.norm(dim=1, keepdim=True).clamp_min(1e-30)
    lorsa.W_V.copy_(W_V.to(lorsa.W_V.dtype))
    lorsa.W_O.copy_(W_O.to(lorsa.W_O.dtype))
    if copy_qk:
        init_qk_from_mhsa_(lorsa, w, trainable=qk_trainable, assignment="block")
    return lorsa


# --------------------------------------------------------------------------------------------------------------------
# The exact decomposition
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def exact_from_mhsa(
    w: MHSAWeights, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Lorsa:
    """A Lorsa that computes exactly the MHSA ``w``: H = 2 * n_heads * d_head heads in G = n_heads QK groups of
    2 * d_head heads, d_qk = d_head, K = H.

    QK group i is MHSA query head i (W_Q, b_Q of head i; W_K, b_K of its KV group, so GQA keys are copied per group;
    q/k norms copied). For value dimension j of head i and sign s in (+1, -1), head i*2*d_head + (0 if s > 0 else
    d_head) + j has w_v = s W_V[kv(i), j], b_v = s b_V[kv(i), j], w_o = s W_O[:, i*d_head + j]. Its z is s times
    the MHSA's z_{i,j} (softmax rows sum to one, so the value bias passes through), and
    ReLU(z) w_o + ReLU(-z)(-w_o) = z w_o: the pair reproduces that value dimension's contribution. b_O is the MHSA's
    output bias (zero if none). Positions, causality, scale, sliding window and soft-cap are the MHSA's
    (``LorsaConfig.from_mhsa``). With K = H every head is kept, so top-K selection plays no role."""
    if not isinstance(w, MHSAWeights):
        raise RanklensError(
            f"expected MHSAWeights (from ranklens.lm.attention.mhsa_weights), got {type(w).__name__}"
        )
    n, dh, d = w.n_heads, w.d_head, w.d_model
    H = 2 * n * dh
    cfg = LorsaConfig.from_mhsa(w, n_heads=H, n_qk_groups=n, k=H, dtype=dtype or w.dtype)
    lorsa = Lorsa(cfg, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        init_qk_from_mhsa_(lorsa, w, trainable=True, assignment="block")
    dt, dev = lorsa.W_V.dtype, lorsa.W_V.device
    kv = torch.arange(n) // w.group_size
    Wv = w.W_V[kv].to(dev, dt)  # [n, dh, d]
    bv = w.b_V[kv].to(dev, dt) if w.b_V is not None else torch.zeros(n, dh, dtype=dt, device=dev)
    Wo = w.W_O.to(dev, dt).T.reshape(n, dh, d)  # row i*dh + j = column i*dh + j of W_O
    sign = torch.tensor([1.0, -1.0], dtype=dt, device=dev)[None, :, None]  # [1, 2, 1]
    lorsa.W_V.copy_((sign[..., None] * Wv[:, None]).reshape(H, d))
    lorsa.b_V.copy_((sign * bv[:, None]).reshape(H))
    lorsa.W_O.copy_((sign[..., None] * Wo[:, None]).reshape(H, d))
    lorsa.b_O.copy_(w.b_O.to(dev, dt) if w.b_O is not None else torch.zeros(d, dtype=dt, device=dev))
    return lorsa
