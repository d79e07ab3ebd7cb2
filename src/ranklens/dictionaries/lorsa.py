"""Lorsa: Low-Rank Sparse Attention (He et al. 2025, "Towards Understanding the Nature of Attention with Low-Rank
Sparse Decomposition", Section 3, Algorithm 1).

A Lorsa layer replaces one MHSA layer: it reads the attention input x [B, T, d] and is trained to predict the attention
output. It has H heads with one-dimensional OV circuits (Section 3.1, "One-Dimensional Output and Values")::

    v^h = x w_v^h + b_v^h                       scalar value per token                     (Alg. 1, line 4)
    A^g = softmax(q^g (k^g)^T * scale + mask)   one pattern per QK group g, shared by its  (Alg. 1, line 5)
                                                H/G heads ("Query and Key Weights with Parameter Sharing")
    z^h = A^{g(h)} v^h                          scalar activation                          (Alg. 1, line 6)
    z^h <- ReLU(z^h)                                                                        (Appendix B.4)
    S   = top-K heads per token by z^h ||w_o^h||                                           (Alg. 1, line 8; footnote 3)
    y   = sum_{h in S} z^h w_o^h + b_O                                                     (Alg. 1, lines 7, 9)

Head h belongs to QK group ``h // (H // G)``. Positions follow the target (Appendix A): RoPE, when the target uses
it, rotates Lorsa's queries and keys exactly as the target does (``RopeSpec``; GPT-NeoX partial rotary included);
absolute-position models (GPT-2, BERT) get no positional term. For GQA targets Lorsa still has one Q and one K per
group (Appendix A: no grouped queries inside Lorsa). Optional extras that only serve to mirror a target exactly:
a per-group RMSNorm on q and k (Qwen3's q/k norms), a sliding window (Mistral, Gemma 2, Qwen sliding layers) and
logit soft-capping (Gemma 2). Masks: causal for causal targets, bidirectional for encoders, and padding (keys with
attention_mask == 0 are invisible). Padded query positions are computed like any other (with right padding they equal
what the target computes there); a query with no visible key gets z = 0.

Computation: attention is computed once per QK group for all of its heads. One ``F.scaled_dot_product_attention``
call takes q, k [B, G, T, d_qk] and, as its value, the group's H/G scalar values stacked [B, G, T, H/G], so the output
is every head's z at once (``LorsaConfig.group_chunk`` splits the groups into chunks of that many, one call per chunk,
with a running top-K across chunks, so that [B, T, H] need not exist at once). With soft-capping, which SDPA cannot
express, the same grouped computation is written out with matmuls. The output is decoded sparsely from the K selected
rows of W_O with ``F.embedding_bag`` (as an SAE decoder).

Parameters keep the head (feature) on dim 0 wherever they are per head, for row-sparse optimizers (SparseAdam):
``W_Q, W_K [G, d_qk, d]``, ``b_Q, b_K [G, d_qk]``, ``W_V [H, d]``, ``b_V [H]``, ``W_O [H, d]``, ``b_O [d]``
(and ``q_norm_weight, k_norm_weight [G, d_qk]`` with ``qk_norm``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ranklens.errors import RanklensError
from ranklens.lm.attention import (
    MHSAWeights,
    RopeSpec,
    attention_allowed,
    check_inputs,
    default_positions,
    rms_norm,
)

__all__ = ["Lorsa", "LorsaConfig", "LorsaOutput"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _pos_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RanklensError(f"LorsaConfig.{name}={v!r}: expected a positive int")
    return v


@dataclass(frozen=True)
class LorsaConfig:
    """Shape and attention scheme of a Lorsa layer (Lorsa paper Section 3.1, Table 1; App. A, B).

    d_model: width of the attention input/output. n_heads: H, the number of Lorsa heads (1-D OV circuits).
    n_qk_groups: G, independent QK circuits; H must be divisible by G (the paper binds d_qk heads per group,
    Table 1; App. B: G should be >= the target's head count). d_qk: query/key width per group (App. B: >= the target's
    d_head; ``from_mhsa`` defaults it to d_head). k: heads kept per token (top-K). scale: attention logit scale
    (default d_qk ** -0.5; ``from_mhsa`` takes the target's, e.g. Gemma 2's query_pre_attn_scalar ** -0.5).
    """

    d_model: int
    n_heads: int
    n_qk_groups: int
    d_qk: int
    k: int
    positions: RopeSpec | None = None
    causal: bool = True
    scale: float | None = None
    sliding_window: int | None = None
    softcap: float | None = None
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    use_value_bias: bool = True
    use_output_bias: bool = True
    dtype: torch.dtype = torch.float32
    group_chunk: int | None = None
    # Populated in __post_init__; not a constructor argument.
    heads_per_group: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        d = _pos_int("d_model", self.d_model)
        H = _pos_int("n_heads", self.n_heads)
        G = _pos_int("n_qk_groups", self.n_qk_groups)
        dqk = _pos_int("d_qk", self.d_qk)
        K = _pos_int("k", self.k)
        del d
        if H % G:
            raise RanklensError(
                f"LorsaConfig: n_heads {H} is not divisible by n_qk_groups {G}; expected H to be a multiple of G"
            )
        if K > H:
            raise RanklensError(f"LorsaConfig: k={K} exceeds n_heads={H}; expected 1 <= k <= n_heads")
        if self.positions is not None:
            if not isinstance(self.positions, RopeSpec):
                raise RanklensError(
                    f"LorsaConfig.positions={self.positions!r}: expected a RopeSpec or None (absolute positions)"
                )
            if self.positions.rotary_dim > dqk:
                raise RanklensError(
                    f"LorsaConfig: rotary_dim {self.positions.rotary_dim} exceeds d_qk {dqk}; expected <= d_qk"
                )
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise RanklensError(
                f"LorsaConfig.scale={self.scale!r}: expected a positive finite number or None"
            )
        if self.sliding_window is not None:
            _pos_int("sliding_window", self.sliding_window)
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise RanklensError(
                f"LorsaConfig.softcap={self.softcap!r}: expected a positive finite number or None"
            )
        if self.group_chunk is not None:
            _pos_int("group_chunk", self.group_chunk)
        if self.dtype not in _DTYPES.values():
            raise RanklensError(f"LorsaConfig.dtype={self.dtype!r}: expected one of {', '.join(_DTYPES)}")
        object.__setattr__(self, "heads_per_group", H // G)

    @property
    def attn_scale(self) -> float:
        return self.d_qk**-0.5 if self.scale is None else float(self.scale)

    @classmethod
    def from_mhsa(
        cls, w: MHSAWeights, n_heads: int, n_qk_groups: int, k: int, d_qk: int | None = None, **kwargs
    ) -> LorsaConfig:
        """A config mirroring the attention scheme of ``w`` (an ``MHSAWeights``): d_model, d_qk (default d_head),
        RoPE, causality, scale, sliding window, soft-cap and q/k norms.

        A d_qk below the MHSA's rotary dimension (the Lorsa paper's App. B.1 ablation on a model whose heads rotate
        fully) rotates with every r-th of its frequencies, r = rotary_dim / d_qk: theta^(-2 r i / D) =
        theta^(-2 i / (D / r)), the RoPE a head of dimension d_qk has with the same base (rescaled frequencies keep
        their rescaling)."""
        qk_norm = w.q_norm is not None
        d_qk = w.d_head if d_qk is None else d_qk
        positions = w.positions
        if positions is not None and positions.rotary_dim > d_qk:
            if positions.rotary_dim % d_qk or d_qk % 2:
                raise RanklensError(f"d_qk {d_qk} is below the MHSA's rotary dimension {positions.rotary_dim} and "
                                    "does not divide it; expected an even divisor (or at least the rotary dimension)")
            positions = replace(positions, inv_freq=positions.inv_freq[:: positions.rotary_dim // d_qk])
        base = dict(
            d_model=w.d_model,
            n_heads=n_heads,
            n_qk_groups=n_qk_groups,
            d_qk=d_qk,
            k=k,
            positions=positions,
            causal=w.causal,
            scale=w.scale,
            sliding_window=w.sliding_window,
            softcap=w.softcap,
            qk_norm=qk_norm,
            qk_norm_eps=w.q_norm.eps if qk_norm else 1e-6,
            dtype=w.dtype,
        )
        base.update(kwargs)
        return cls(**base)

    def to_dict(self) -> dict:
        """JSON-ready dict (for a cfg.json next to the weights)."""
        out = asdict(self)
        out.pop("heads_per_group")
        out["positions"] = None if self.positions is None else self.positions.to_dict()
        out["dtype"] = next(n for n, t in _DTYPES.items() if t == self.dtype)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> LorsaConfig:
        d = dict(d)
        if d.get("positions") is not None:
            d["positions"] = RopeSpec.from_dict(d["positions"])
        if isinstance(d.get("dtype"), str):
            if d["dtype"] not in _DTYPES:
                raise RanklensError(f"LorsaConfig dtype {d['dtype']!r}: expected one of {', '.join(_DTYPES)}")
            d["dtype"] = _DTYPES[d["dtype"]]
        try:
            return cls(**d)
        except TypeError as err:
            raise RanklensError(f"bad LorsaConfig dict: {err}") from err


@dataclass
class LorsaOutput:
    """out [B, T, d]: the prediction; values [B, T, K] >= 0 and indices [B, T, K]: the sparse code (the selected
    heads' ReLU'd z, sorted by z ||w_o|| descending); attention_mask: the mask it was computed with (or None)."""

    out: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def active_heads(self) -> torch.Tensor:
        """Sorted unique heads selected with a nonzero value at some non-masked position (int64 [n_active])."""
        live = self.values > 0
        if self.attention_mask is not None:
            live = live & self.attention_mask.bool()[..., None]
        return torch.unique(self.indices[live])

    def dense(self, n_heads: int) -> torch.Tensor:
        """The code as a dense [B, T, n_heads] tensor (zeros outside the selected heads)."""
        z = self.values.new_zeros(*self.values.shape[:-1], n_heads)
        return z.scatter(-1, self.indices, self.values)


class Lorsa(nn.Module):
    """Low-Rank Sparse Attention, Algorithm 1 of the Lorsa paper (see the module docstring)."""

    def __init__(self, cfg: LorsaConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, LorsaConfig):
            raise RanklensError(f"Lorsa expects a LorsaConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        H, G, dqk, d = cfg.n_heads, cfg.n_qk_groups, cfg.d_qk, cfg.d_model
        kw = dict(dtype=cfg.dtype, device=device)
        self.W_Q = nn.Parameter(torch.zeros(G, dqk, d, **kw))
        self.b_Q = nn.Parameter(torch.zeros(G, dqk, **kw))
        self.W_K = nn.Parameter(torch.zeros(G, dqk, d, **kw))
        self.b_K = nn.Parameter(torch.zeros(G, dqk, **kw))
        self.W_V = nn.Parameter(torch.zeros(H, d, **kw))
        self.b_V = nn.Parameter(torch.zeros(H, **kw)) if cfg.use_value_bias else None
        self.W_O = nn.Parameter(torch.zeros(H, d, **kw))
        self.b_O = nn.Parameter(torch.zeros(d, **kw)) if cfg.use_output_bias else None
        if cfg.qk_norm:
            self.q_norm_weight = nn.Parameter(torch.ones(G, dqk, **kw))
            self.k_norm_weight = nn.Parameter(torch.ones(G, dqk, **kw))
        else:
            self.q_norm_weight = self.k_norm_weight = None
        if cfg.positions is not None:
            self.register_buffer(
                "rope_inv_freq",
                cfg.positions.inv_freq.to(device=device, dtype=torch.float32),
                persistent=False,
            )
        else:
            self.rope_inv_freq = None

    # ---- properties ------------------------------------------------------------------------------------------------

    @property
    def n_heads(self) -> int:
        return self.cfg.n_heads

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    def group_of(self, head: int) -> int:
        """The QK group of a head: head // (H // G)."""
        return head // self.cfg.heads_per_group

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_model={c.d_model}, n_heads={c.n_heads}, n_qk_groups={c.n_qk_groups}, d_qk={c.d_qk}, k={c.k}, "
            f"rope={c.positions is not None}, causal={c.causal}"
        )

    # ---- attention per group ----------------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[int, int]:
        return check_inputs(x, self.cfg.d_model, attention_mask, "Lorsa")

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        """Cast to the parameters' dtype; activations captured under torch.inference_mode() are copied, since
        autograd cannot save inference tensors."""
        x = x.to(self.W_V.dtype)
        if x.is_inference() and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            x = x.clone()
        return x

    def _rope(self, B: int, T: int, position_ids: torch.Tensor | None, x: torch.Tensor):
        if self.cfg.positions is None:
            return None
        pos = default_positions(B, T, position_ids, x.device)
        spec = RopeSpec(inv_freq=self.rope_inv_freq, attention_scaling=self.cfg.positions.attention_scaling)
        cos, sin = spec.cos_sin(pos, x.dtype, x.device)  # [B, T, rd]
        return spec, cos[:, :, None], sin[:, :, None]  # broadcast over the group dim of [B, T, g, d_qk]

    def _qk(self, x: torch.Tensor, groups: slice, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B, g, T, d_qk] of the given groups, normalized and rotated like the target's.

        Computed as one [B, T, g * d_qk] matmul each and rotated in that layout; the returned tensors are transposed
        views (no copy), which SDPA reads as they are."""
        B, T = x.shape[:2]
        W_Q, W_K = self.W_Q[groups], self.W_K[groups]  # [g, d_qk, d]
        g, dqk = W_Q.shape[0], W_Q.shape[1]
        q = F.linear(x, W_Q.reshape(g * dqk, -1), self.b_Q[groups].reshape(-1)).view(B, T, g, dqk)
        k = F.linear(x, W_K.reshape(g * dqk, -1), self.b_K[groups].reshape(-1)).view(B, T, g, dqk)
        if self.cfg.qk_norm:
            # Normalized in at least float32 (Qwen3 normalizes in float32 even for float64 models; a float64 Lorsa
            # keeps float64, so it matches such a target to ~1e-7 rather than to the last bit).
            eps, up = self.cfg.qk_norm_eps, torch.promote_types(q.dtype, torch.float32)
            q = rms_norm(q, self.q_norm_weight[groups], eps, upcast=up)
            k = rms_norm(k, self.k_norm_weight[groups], eps, upcast=up)
        if rope is not None:
            spec, cos, sin = rope
            q, k = spec.apply(q, cos, sin), spec.apply(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)

    def _values(self, x: torch.Tensor, heads: slice) -> torch.Tensor:
        """v [B, T, h] = x w_v^h + b_v^h for the given heads (Alg. 1, line 4)."""
        v = x @ self.W_V[heads].T
        if self.b_V is not None:
            v = v + self.b_V[heads]
        return v

    def _mask(self, T: int, attention_mask: torch.Tensor | None, device: torch.device):
        """(allowed [B|1, 1, T, T] bool or None, rows_ok [B|1, 1, T, 1] or None): visibility with every fully
        masked row opened up (to keep softmax finite) and the rows to zero afterwards."""
        allowed = attention_allowed(T, attention_mask, self.cfg.causal, self.cfg.sliding_window, device)
        if allowed is None:
            return None, None
        rows_ok = allowed.any(-1, keepdim=True)  # [B|1, T, 1]
        if bool(rows_ok.all()):
            return allowed[:, None], None
        return (allowed | ~rows_ok)[:, None], rows_ok[:, None]

    def _attend(self, q, k, v, allowed, rows_ok, is_causal: bool = False) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v per group: q, k [B, g, T, dqk], v [B, g, T, n] -> [B, g, T, n].
        ``is_causal``: the mask is exactly causal (``allowed`` is None), which SDPA's kernels exploit."""
        scale = self.cfg.attn_scale
        if is_causal:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        elif self.cfg.softcap is None:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
        else:
            z = self._attend_manual(q, k, v, allowed, scale)
        if rows_ok is not None:
            z = z * rows_ok
        return z

    def _probs(self, q, k, allowed, scale: float) -> torch.Tensor:
        s = (q @ k.transpose(-1, -2)) * scale
        if self.cfg.softcap is not None:
            s = torch.tanh(s / self.cfg.softcap) * self.cfg.softcap
        if allowed is not None:
            s = s.masked_fill(~allowed, -math.inf)
        low = s.dtype in (torch.float16, torch.bfloat16)
        return torch.softmax(s.float() if low else s, dim=-1).to(q.dtype)

    def _attend_manual(self, q, k, v, allowed, scale: float) -> torch.Tensor:
        return self._probs(q, k, allowed, scale) @ v

    def _z_chunks(self, x, attention_mask, position_ids):
        """Yields (first head, pre-ReLU z [B, T, n] of the heads of a chunk of groups)."""
        B, T = self._check(x, attention_mask)
        x = self._prep(x)
        rope = self._rope(B, T, position_ids, x)
        c = self.cfg
        # Without padding, sliding window or soft-cap the mask is plain causal: SDPA's is_causal path skips the
        # masked half instead of reading a [T, T] mask (same result, tested against the explicit mask).
        is_causal = attention_mask is None and c.causal and c.sliding_window is None and c.softcap is None
        allowed, rows_ok = (None, None) if is_causal else self._mask(T, attention_mask, x.device)
        G, n = self.cfg.n_qk_groups, self.cfg.heads_per_group
        chunk = self.cfg.group_chunk or G
        for g0 in range(0, G, chunk):
            g1 = min(G, g0 + chunk)
            q, k = self._qk(x, slice(g0, g1), rope)
            v = self._values(x, slice(g0 * n, g1 * n))  # [B, T, (g1-g0) * n]
            v = v.view(B, T, g1 - g0, n).transpose(1, 2)  # [B, g, T, n]: the group's heads as value dims
            z = self._attend(q, k, v, allowed, rows_ok, is_causal)  # [B, g, T, n]
            yield g0 * n, z.transpose(1, 2).reshape(B, T, (g1 - g0) * n)

    # ---- public API -------------------------------------------------------------------------------------------------

    def z_pre(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every head's pre-ReLU activation z [B, T, H] (dense; for analysis, AuxK and tests)."""
        return torch.cat([z for _, z in self._z_chunks(x, attention_mask, position_ids)], dim=-1)

    def encode(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sparse code: (values [B, T, K] = ReLU(z) of the selected heads, indices [B, T, K]), the top-K heads
        per token by ReLU(z^h) ||w_o^h|| (footnote 3), sorted descending."""
        values, indices, _ = self._encode(x, attention_mask, position_ids, keep_pre=False)
        return values, indices

    def encode_with_pre(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``encode`` plus every head's pre-ReLU z [B, T, H] from the same pass (with its autograd graph), for
        objectives that need the unselected heads too (AuxK on the dead heads)."""
        return self._encode(x, attention_mask, position_ids, keep_pre=True)

    def _encode(self, x, attention_mask, position_ids, keep_pre: bool):
        K = self.cfg.k
        with torch.no_grad():
            o_norm = self.W_O.norm(dim=1)  # [H]
        best_s = best_v = best_i = None
        pre = []
        for h0, z in self._z_chunks(x, attention_mask, position_ids):
            if keep_pre:
                pre.append(z)
            a = F.relu(z)  # Appendix B.4
            s = a.detach() * o_norm[h0 : h0 + z.shape[-1]].to(a.dtype)
            s_top, idx = s.topk(min(K, z.shape[-1]), dim=-1)
            v_top = a.gather(-1, idx)
            idx = idx + h0
            if best_s is None:
                best_s, best_v, best_i = s_top, v_top, idx
            else:
                s_all = torch.cat([best_s, s_top], -1)
                best_s, pick = s_all.topk(min(K, s_all.shape[-1]), dim=-1)
                best_v = torch.cat([best_v, v_top], -1).gather(-1, pick)
                best_i = torch.cat([best_i, idx], -1).gather(-1, pick)
        return best_v, best_i, (torch.cat(pre, dim=-1) if keep_pre else None)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """sum_k values[..., k] W_O[indices[..., k]] + b_O (Alg. 1, lines 7 and 9), via embedding_bag."""
        lead, K = values.shape[:-1], values.shape[-1]
        out = F.embedding_bag(
            indices.reshape(-1, K),
            self.W_O,
            per_sample_weights=values.reshape(-1, K).to(self.W_O.dtype),
            mode="sum",
        ).view(*lead, self.cfg.d_model)
        if self.b_O is not None:
            out = out + self.b_O
        return out

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> LorsaOutput:
        """x [B, T, d] (the target's attention input), attention_mask [B, T] (1 = token, 0 = padding) or None."""
        values, indices = self.encode(x, attention_mask, position_ids)
        return LorsaOutput(self.decode(values, indices), values, indices, attention_mask)

    def z_pattern(
        self,
        x: torch.Tensor,
        head: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The z pattern of one head (Lorsa paper Section 4.1): contributions A_ij v_j of each source token j to
        z_i, [B, T, T] (or [T, T] for x [T, d]). Summing over j gives the head's pre-ReLU z."""
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < self.cfg.n_heads:
            raise RanklensError(
                f"head {head!r} is out of range; expected an int in 0..{self.cfg.n_heads - 1}"
            )
        single = isinstance(x, torch.Tensor) and x.ndim == 2
        if single:
            x = x[None]
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        B, T = self._check(x, attention_mask)
        x = self._prep(x)
        g = self.group_of(head)
        rope = self._rope(B, T, position_ids, x)
        allowed, rows_ok = self._mask(T, attention_mask, x.device)
        q, k = self._qk(x, slice(g, g + 1), rope)  # [B, 1, T, dqk]
        a = self._probs(q, k, allowed, self.cfg.attn_scale)  # [B, 1, T, T]
        if rows_ok is not None:
            a = a * rows_ok
        v = self._values(x, slice(head, head + 1))[..., 0]  # [B, T]
        pattern = a[:, 0] * v[:, None, :]
        return pattern[0] if single else pattern

    @torch.no_grad()
    def z_rows(self, x: torch.Tensor, heads: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """For one sequence x [T, d] (unpadded): row ``queries[m]`` of the z pattern of head ``heads[m]``, i.e. the
        contributions A_ij v_j of every source j to that head's z at that query, [m, T]. The rows ``z_pattern``
        gives, computed per QK group for the queries asked only (a dashboard needs a few rows of many heads)."""
        x = self._prep(x[None])
        T = x.shape[1]
        rope = self._rope(1, T, None, x)
        allowed, rows_ok = self._mask(T, None, x.device)
        out = torch.zeros(heads.numel(), T, dtype=x.dtype, device=x.device)
        groups = heads // self.cfg.heads_per_group
        for g in groups.unique().tolist():
            sel = (groups == g).nonzero().squeeze(1)
            rows = queries[sel]
            q, k = self._qk(x, slice(g, g + 1), rope)  # [1, 1, T, d_qk]
            mask = None if allowed is None else allowed[:, :, rows]
            a = self._probs(q[:, :, rows], k, mask, self.cfg.attn_scale)[0, 0]  # [m_g, T]
            if rows_ok is not None:
                a = a * rows_ok[0, 0, rows]
            v = x[0] @ self.W_V[heads[sel]].T  # [T, m_g]
            if self.b_V is not None:
                v = v + self.b_V[heads[sel]]
            out[sel] = a * v.T
        return out

    def qk_rows(self, x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [T, d_qk] of QK group `group` on one unpadded sequence x [T, d], normalized and rotated as in the
        forward (for analyses that perturb them)."""
        x = self._prep(x[None])
        q, k = self._qk(x, slice(group, group + 1), self._rope(1, x.shape[1], None, x))
        return q[0, 0], k[0, 0]

    def rotate(self, u: torch.Tensor, T: int) -> torch.Tensor:
        """Vectors u [n, d_qk] as the forward rotates a query or key at each position 0..T-1: [n, T, d_qk] (u
        repeated where there is no RoPE)."""
        u = self._prep(u)
        if self.cfg.positions is None:
            return u[:, None, :].expand(-1, T, -1)
        spec, cos, sin = self._rope(1, T, None, u)
        return spec.apply(u[None, None].expand(1, T, -1, -1), cos, sin)[0].transpose(0, 1)

    def query_probs(self, logits: torch.Tensor, query: int) -> torch.Tensor:
        """Attention weights of query position `query` of an unpadded sequence from raw scores q_query . k_j
        [..., T] (before the scale): scaled, soft-capped and masked as the forward does."""
        s = logits * self.cfg.attn_scale
        if self.cfg.softcap is not None:
            s = torch.tanh(s / self.cfg.softcap) * self.cfg.softcap
        allowed = attention_allowed(s.shape[-1], None, self.cfg.causal, self.cfg.sliding_window, s.device)
        if allowed is not None:
            s = s.masked_fill(~allowed[0, query], -math.inf)
        return torch.softmax(s, dim=-1)

    @torch.no_grad()
    def normalize_output_(self) -> Lorsa:
        """Footnote 3 of the Lorsa paper: give every w_o unit norm without changing predictions.

        With n = ||w_o^h||: w_v <- w_v n, b_v <- b_v n, w_o <- w_o / n. Derivation: v and hence z (a convex
        combination of values) scale by n > 0, ReLU commutes with positive scaling, so z' w_o' = (n z)(w_o / n) =
        z w_o; and the top-K score z' ||w_o'|| = n z = z ||w_o|| is unchanged. (The footnote's "w_v <- w_o /
        ||w_o||, b_v <- b_o / ||w_o||" would change the output; multiplying is what keeps it.) Heads with w_o = 0
        are left alone."""
        n = self.W_O.norm(dim=1)
        ok = n > 0
        factor = torch.where(ok, n, torch.ones_like(n))
        self.W_V.mul_(factor[:, None])
        if self.b_V is not None:
            self.b_V.mul_(factor)
        self.W_O.div_(factor[:, None])
        return self
