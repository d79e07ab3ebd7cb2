"""Sparse autoencoders: TopK (paper Section 3.2), BatchTopK, JumpReLU (Appendix E.4, L.1) and ReLU + L1.

Layout: a feature is a ROW of every per-feature tensor, ``W_E [n_features, d_in]``, ``b_E [n_features]``,
``W_D [n_features, d_in]`` (and ``log_threshold [n_features]`` for JumpReLU); ``b_D [d_in]``. The paper's column
convention (``z = W_e x + b_e``, ``x_hat = W_d z + b_d``, Section 3.2) maps onto it as W_e = W_E and W_d = W_D^T, so the
paper's ``W_E = W_D^T`` (Section 5.2) is ``W_E = W_D`` here. Row layout is what a row-wise SparseAdam (Appendix M) and
the sparse kernels (``ranklens.dictionaries.kernels``) rely on: everything about feature i is row i.

The trainer computes the reconstruction loss; this module gives the code, the reconstruction and the sparsity penalty
(ReLU: L1 weighted by decoder norms; JumpReLU: L0 through the straight-through estimator). TopK uses the sparse kernels,
so its training cost grows with k, not with n_features, except for the encoder's one dense forward product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ValidationError, model_validator
from torch import nn

from ranklens.config import Config
from ranklens.dictionaries import kernels
from ranklens.errors import RanklensError

__all__ = ["Code", "SAEConfig", "SparseAutoencoder"]

Activation = Literal["topk", "batchtopk", "jumprelu", "relu"]
DTypeName = Literal["float32", "bfloat16", "float64"]

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Rows generated per chunk in the uniform initialization: the float64 scratch stays ~64 MB at any dictionary size.
_INIT_CHUNK_BYTES = 64 << 20


class SAEConfig(Config):
    """Architecture of a sparse autoencoder (unknown keys are an error; immutable).

    Fields:
        d_in: input dimension d. n_features: dictionary size h (Section 5.2 notation).
        activation: "topk" (Section 3.2, the paper's default), "batchtopk" (Bussmann et al. 2024), "jumprelu"
            (Rajamanoharan et al. 2024; Appendix E.4) or "relu" (ReLU + L1).
        k: active features per token (topk) or per token on average over a batch (batchtopk); required for those,
            rejected for the others. The paper uses k = 50 (Appendix E.1).
        l1_coefficient: ReLU's lambda in lambda * sum_i f_i ||W_D,i|| (the decoder-norm-weighted L1 of Anthropic /
            Conerly et al.). l0_coefficient: JumpReLU's lambda in lambda * L0 (Rajamanoharan et al. 2024).
        jumprelu_bandwidth: width eps of the rectangle kernel of the STE. jumprelu_init_threshold: initial theta
            (both 0.001 in Rajamanoharan et al., for inputs scaled to unit mean squared norm).
        normalize_decoder: keep decoder rows at unit norm (at init and whenever the trainer calls
            ``normalize_decoder_()``, e.g. after each optimizer step).
        apply_b_dec_to_input: encode W_E (x - b_D) + b_E (SAELens' flag) instead of the paper's W_E x + b_E
            (Section 3.2, the default).
        dtype: parameter dtype.
    """

    d_in: int
    n_features: int
    activation: Activation = "topk"
    k: int | None = None
    l1_coefficient: float = 1.0
    l0_coefficient: float = 1.0
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    normalize_decoder: bool = False
    apply_b_dec_to_input: bool = False
    dtype: DTypeName = "float32"

    def __init__(self, **data: Any) -> None:
        # Direct construction raises the same one-line RanklensError as Config.build, not a pydantic traceback.
        try:
            super().__init__(**data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise RanklensError(f"bad SAEConfig: {where}: {first['msg']} (got {first.get('input')!r})") from err

    @model_validator(mode="after")
    def _check(self) -> SAEConfig:
        # RanklensError is not a ValueError, so pydantic lets it through unchanged.
        if self.d_in < 1:
            raise RanklensError(f"SAEConfig d_in={self.d_in}; expected a positive int")
        if self.n_features < 1:
            raise RanklensError(f"SAEConfig n_features={self.n_features}; expected a positive int")
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                raise RanklensError(f"SAEConfig activation={self.activation!r} needs k (e.g. k=50); got k=None")
            if not 1 <= self.k <= self.n_features:
                raise RanklensError(
                    f"SAEConfig k={self.k}; expected 1 <= k <= n_features={self.n_features}"
                )
        elif self.k is not None:
            raise RanklensError(
                f"SAEConfig k={self.k} with activation={self.activation!r}; k is only used by topk and batchtopk"
            )
        for name in ("l1_coefficient", "l0_coefficient"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise RanklensError(f"SAEConfig {name}={v}; expected a finite number >= 0")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise RanklensError(f"SAEConfig {name}={v}; expected a finite number > 0")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass
class Code:
    """The sparse code of a batch of N tokens.

    TopK: ``values`` [N, k] (>= 0) and ``indices`` [N, k] (int64, ascending per row). Other activations: ``dense``
    [N, n_features]. JumpReLU also keeps ``pre`` = relu(pre-activations) [N, n_features], which its L0 penalty needs.
    Values that are 0 (a top-k pick whose pre-activation was <= 0) do not count as active.
    """

    n_features: int
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    pre: torch.Tensor | None = None

    @property
    def is_sparse(self) -> bool:
        return self.values is not None

    @property
    def n_tokens(self) -> int:
        return int((self.values if self.is_sparse else self.dense).shape[0])  # type: ignore[union-attr]

    def to_dense(self) -> torch.Tensor:
        """[N, n_features] activations (differentiable)."""
        if self.is_sparse:
            assert self.values is not None and self.indices is not None
            out = self.values.new_zeros(self.values.shape[0], self.n_features)
            return out.scatter(1, self.indices, self.values)
        assert self.dense is not None
        return self.dense

    def active_mask(self) -> torch.Tensor:
        """Bool [N, k] (sparse) or [N, n] (dense): which entries are nonzero."""
        return (self.values if self.is_sparse else self.dense) != 0  # type: ignore[operator]

    def active_features(self) -> torch.Tensor:
        """Sorted unique indices (int64) of the features that fired (nonzero) on at least one token of the batch."""
        return self.feature_counts().nonzero().squeeze(1)  # a bincount, not torch.unique's sort of B k indices

    def feature_counts(self) -> torch.Tensor:
        """[n_features] int64: on how many tokens of the batch each feature fired (for dead-feature tracking)."""
        if self.is_sparse:
            assert self.indices is not None
            return torch.bincount(self.indices[self.active_mask()], minlength=self.n_features)
        return self.active_mask().sum(0)

    @property
    def l0(self) -> torch.Tensor:
        """Mean number of nonzero features per token (0-d float32 tensor, detached)."""
        mask = self.active_mask()
        if mask.shape[0] == 0:
            return torch.zeros((), dtype=torch.float32, device=mask.device)
        return mask.sum(1).to(torch.float32).mean().detach()


@torch.no_grad()
def _fill_uniform_unit_rows_(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill out [n, d] with rows drawn from U(-1, 1)^d and scaled to unit norm (Appendix E.3: "initialized
    uniformly"), in place.

    Drawn on the CPU in float64 in fixed-size row chunks, so a given generator state gives the same rows on any device
    and in any dtype, and the scratch memory stays bounded (~64 MB) for million-feature dictionaries.
    """
    n, d = out.shape
    step = max(1, _INIT_CHUNK_BYTES // (8 * d))
    for i in range(0, n, step):
        m = min(step, n - i)
        w = torch.rand(m, d, generator=generator, dtype=torch.float64) * 2 - 1
        w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-300)
        out[i : i + m] = w.to(device=out.device, dtype=out.dtype)
    return out


@torch.no_grad()
def _normalize_rows_(t: torch.Tensor) -> torch.Tensor:
    """Scale every row of t [n, d] to unit norm in place, chunk by chunk (norms of half-precision rows in float32)."""
    n, d = t.shape
    acc = kernels._acc_dtype(t.dtype)
    step = max(1, _INIT_CHUNK_BYTES // (8 * d))
    for i in range(0, n, step):
        w = t[i : i + step].to(acc)
        t[i : i + step] = (w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-30)).to(t.dtype)
    return t


def _autocast_input(rows: torch.Tensor) -> torch.Tensor:
    """Honour an enclosing autocast in the TopK encoder: its product is an ``addmm(..., out=)``, which autocast never
    casts, and it runs in x's dtype, so x is cast here (bf16 on CPU: ~1.45x faster steps, bench/README.md)."""
    device_type = rows.device.type
    if torch.is_autocast_enabled(device_type):
        return rows.to(torch.get_autocast_dtype(device_type))
    return rows


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over d_in-dimensional activations with n_features features (rows).

    Construct from an ``SAEConfig`` or its fields: ``SparseAutoencoder(SAEConfig(d_in=576, n_features=4608, k=50))``
    or ``SparseAutoencoder(d_in=576, n_features=4608, k=50)``. The constructor's initialization uses no data: decoder
    rows uniform on U(-1, 1)^d scaled to unit norm, W_E = W_D, zero biases, theta = jumprelu_init_threshold. For the
    paper's initializations (decoder-norm grid search, ASI, random subspace) see ``ranklens.dictionaries.init``.

    Dtypes: the encoder product runs in the input's dtype (so bf16 activations use the fast bf16 matmul even with
    float32 parameters); decoding runs in the parameter dtype, and ``x_hat`` has the parameter dtype.
    """

    def __init__(
        self,
        config: SAEConfig | None = None,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        **fields: Any,
    ) -> None:
        super().__init__()
        if config is None:
            config = SAEConfig(**fields)
        elif fields:
            raise RanklensError(f"SparseAutoencoder: got a config and also fields {sorted(fields)}; pass one or the other")
        if not isinstance(config, SAEConfig):
            raise RanklensError(f"SparseAutoencoder: config is a {type(config).__name__}; expected an SAEConfig")
        self.config = config
        n, d = config.n_features, config.d_in
        dt = config.torch_dtype
        dev = torch.device("cpu") if device is None else torch.device(device)
        w = _fill_uniform_unit_rows_(torch.empty(n, d, dtype=dt, device=dev), generator)
        self.W_E = nn.Parameter(w.clone())  # [n_features, d_in]
        self.b_E = nn.Parameter(torch.zeros(n, dtype=dt, device=dev))  # [n_features]
        self.W_D = nn.Parameter(w)  # [n_features, d_in]
        self.b_D = nn.Parameter(torch.zeros(d, dtype=dt, device=dev))  # [d_in]
        if config.activation == "jumprelu":
            # log-parameterized so theta stays positive under any optimizer step (Rajamanoharan et al. 2024)
            init = math.log(config.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((n,), init, dtype=dt, device=dev))  # [n_features]
        else:
            self.register_parameter("log_threshold", None)

    # ------------------------------------------------------------------ properties

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def threshold(self) -> torch.Tensor:
        """JumpReLU thresholds theta = exp(log_threshold), [n_features]."""
        if self.log_threshold is None:
            raise RanklensError(f"threshold: activation={self.config.activation!r} has none; expected 'jumprelu'")
        return self.log_threshold.exp()

    def extra_repr(self) -> str:
        c = self.config
        k = f", k={c.k}" if c.k is not None else ""
        return f"d_in={c.d_in}, n_features={c.n_features}, activation={c.activation!r}{k}, dtype={c.dtype}"

    # ------------------------------------------------------------------ forward pieces

    def _rows(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise RanklensError(f"{what}: x is a {type(x).__name__}; expected a tensor [..., d_in={self.d_in}]")
        if x.ndim < 1 or x.shape[-1] != self.d_in:
            got = x.shape[-1] if x.ndim >= 1 else "none (a scalar)"
            raise RanklensError(
                f"{what}: x has last dimension {got} (shape {tuple(x.shape)}); expected d_in={self.d_in}"
            )
        if not x.is_floating_point():
            raise RanklensError(f"{what}: x has dtype {x.dtype}; expected a floating-point tensor")
        rows = x.reshape(-1, self.d_in)
        if self.config.apply_b_dec_to_input:
            rows = rows - self.b_D.to(rows.dtype)
        return rows

    def _affine(self, rows: torch.Tensor) -> torch.Tensor:
        return F.linear(rows, self.W_E.to(rows.dtype), self.b_E.to(rows.dtype))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """W_E x + b_E (or W_E (x - b_D) + b_E with apply_b_dec_to_input) before any nonlinearity, [N, n_features]
        in x's dtype, N = the number of rows of x [..., d_in]. Dense: meant for analysis, not for the TopK hot path."""
        return self._affine(self._rows(x, "pre_activations"))

    def encode(self, x: torch.Tensor, *, k: int | None = None) -> Code:
        """The code of x [..., d_in] (flattened to N rows).

        ``k`` overrides the configured k for this call only (topk/batchtopk; e.g. a K-annealing schedule, Appendix
        L.2), without mutating the module.
        """
        c = self.config
        rows = self._rows(x, "encode")
        if k is not None and c.activation not in ("topk", "batchtopk"):
            raise RanklensError(f"encode: k={k!r} given for activation={c.activation!r}; k applies to topk/batchtopk")
        kk = c.k if k is None else k
        if c.activation == "topk":
            values, indices = kernels.topk_encode(_autocast_input(rows), self.W_E, self.b_E, kk)  # type: ignore[arg-type]
            return Code(c.n_features, values=values, indices=indices)
        pre = self._affine(rows)
        if c.activation == "batchtopk":
            return Code(c.n_features, dense=kernels.batch_topk(pre, kk))  # type: ignore[arg-type]
        if c.activation == "relu":
            return Code(c.n_features, dense=torch.relu(pre))
        # JumpReLU of Rajamanoharan et al. (2024): a ReLU first (their pseudo-code), then z H(z - theta).
        z = torch.relu(pre)
        theta = self.threshold.to(z.dtype)
        return Code(c.n_features, dense=kernels.jumprelu(z, theta, c.jumprelu_bandwidth), pre=z)

    def decode(self, code: Code) -> torch.Tensor:
        """x_hat [N, d_in] = sum_i f_i W_D,i + b_D (Section 3.2), in the parameter dtype."""
        if not isinstance(code, Code):
            raise RanklensError(f"decode: got a {type(code).__name__}; expected a Code from encode()")
        if code.n_features != self.n_features:
            raise RanklensError(f"decode: code has n_features={code.n_features}; expected {self.n_features}")
        if code.is_sparse:
            assert code.values is not None and code.indices is not None
            return kernels.sparse_decode(code.values, code.indices, self.W_D, self.b_D)
        assert code.dense is not None
        return code.dense.to(self.W_D.dtype) @ self.W_D + self.b_D

    @classmethod
    def load(cls, directory: str, device: torch.device | str = "cpu") -> SparseAutoencoder:
        """An SAE saved on disk: a `ranklens train sae` run directory (its sae/), or an SAE directory in the
        SAELens or LlamaScope layout."""
        from pathlib import Path

        from ranklens.dictionaries.load import load_sae

        d = Path(directory)
        return load_sae(d / "sae" if (d / "sae").is_dir() else d, device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Code]:
        """(x_hat with x's shape, code over the flattened rows)."""
        code = self.encode(x)
        x_hat = self.decode(code)
        return x_hat.reshape(x.shape), code

    def to_dense(self, code: Code) -> torch.Tensor:
        """[N, n_features] activations of a code (for analysis)."""
        return code.to_dense()

    # ------------------------------------------------------------------ losses

    def sparsity_penalty(self, code: Code, coefficient: float | None = None) -> torch.Tensor:
        """The sparsity term of the loss, a 0-d tensor averaged over tokens; ``coefficient`` (e.g. from a warm-up
        schedule, Appendix E.4) overrides the configured one.

        - relu: l1_coefficient * mean_tokens sum_i f_i ||W_D,i|| (L1 weighted by decoder norms, Anthropic / Conerly
          et al.), differentiable in f and in W_D.
        - jumprelu: l0_coefficient * mean_tokens sum_i H(z_i - theta_i) with the rectangle STE giving theta its
          gradient (Rajamanoharan et al. 2024, Eq. 12); z gets none.
        - topk / batchtopk: 0 (sparsity is enforced by the activation, Section 3.2).
        """
        c = self.config
        if c.activation == "relu":
            lam = c.l1_coefficient if coefficient is None else coefficient
            assert code.dense is not None
            norms = torch.linalg.vector_norm(self.W_D, dim=1)
            return lam * (code.dense.to(norms.dtype) * norms).sum(-1).mean()
        if c.activation == "jumprelu":
            lam = c.l0_coefficient if coefficient is None else coefficient
            if code.pre is None:
                raise RanklensError("sparsity_penalty: the JumpReLU code has no pre-activations; expected encode()'s Code")
            theta = self.threshold.to(code.pre.dtype)
            return lam * kernels.step(code.pre, theta, c.jumprelu_bandwidth).sum(-1).mean()
        return torch.zeros((), dtype=self.W_D.dtype, device=self.W_D.device)

    # ------------------------------------------------------------------ constraints

    @torch.no_grad()
    def normalize_decoder_(self) -> SparseAutoencoder:
        """Scale every decoder row to unit norm, in place (call after each optimizer step when normalize_decoder)."""
        _normalize_rows_(self.W_D.data)
        return self
