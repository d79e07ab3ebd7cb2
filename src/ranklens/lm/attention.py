"""The target model's attention layer as plain tensors, and a naive per-head reference implementation of it.

Lorsa (He et al. 2025, "Towards Understanding the Nature of Attention with Low-Rank Sparse Decomposition") replaces
one multi-head self-attention (MHSA) layer: it reads the attention input and predicts the attention output
(Section 3.1), uses the target's own positional scheme (Appendix A: "we apply the same rotary transformations to
Lorsa's computed queries and keys"), and can be initialized from the MHSA's Q/K weights (Appendix B.3) and from the
per-head value subspaces (ASI for Lorsa, dimensional-collapse paper Section 5.4 and Appendix K). All of that needs the
MHSA's weights in one layout whatever the architecture family; this module provides it.

``mhsa_weights(model, layer)`` returns an ``MHSAWeights`` with, per head (Linear layout, out x in)::

    W_Q [n_heads, d_head, d]      b_Q [n_heads, d_head] | None
    W_K [n_kv_heads, d_head, d]   b_K [n_kv_heads, d_head] | None
    W_V [n_kv_heads, d_head, d]   b_V [n_kv_heads, d_head] | None
    W_O [d, n_heads * d_head]     b_O [d] | None                     (Architecture.output_projection)

so that, for query head h with KV group g = kv_group(h) and inputs x [T, d] (the site ``L{layer}.attn_in``)::

    q = x W_Q[h]^T + b_Q[h];  k = x W_K[g]^T + b_K[g];  v = x W_V[g]^T + b_V[g]
    q, k = q_norm(q), k_norm(k)                           (Qwen3 only: RMSNorm over d_head, before RoPE)
    q, k = rope(q), rope(k)                               (RoPE families; GPT-NeoX rotates the first rotary_dim dims)
    s = q k^T * scale;  s = softcap * tanh(s / softcap)   (Gemma 2 only)
    A = softmax(s + mask)                                 (causal, sliding window, padding)
    z_h = A v   -> attn_z = concat_h z_h,  attn_out = attn_z W_O^T + b_O

How each family's fused or transposed layout maps to it (transformers 5.23, ``models/*/modeling_*.py``):

- Llama / Mistral / Qwen2 / Qwen3 / Gemma / Gemma 2: ``q_proj``/``k_proj``/``v_proj`` viewed [heads, d_head, d];
  GQA repeats each KV head over ``n_heads // n_kv_heads`` consecutive query heads (``repeat_kv``), so
  ``kv_group(h) = h // (n_heads // n_kv_heads)``. Qwen2 has q/k/v biases; Qwen3 RMS-normalizes q and k per head
  (``q_norm``/``k_norm``, computed in float32 like the model); Gemma 2 scales by ``query_pre_attn_scalar ** -0.5``
  and soft-caps the logits (``attn_logit_softcapping``); Mistral (all layers) and the "sliding_attention" layers of
  Qwen2/Qwen3/Gemma 2/Gemma 3 attend within a sliding window (key j visible from query i iff i - j < window).
  Gemma 3 has q/k norms with (1 + w) weights, no soft-cap, and per-layer RoPE: sliding and full-attention layers
  rotate with their own frequencies (``RopeSpec.from_module(..., layer_type=...)``).
- GPT-2: ``c_attn`` is a Conv1D with weight [d, 3d] (y = x W + b): columns [0, d) are the queries, [d, 2d) the keys,
  [2d, 3d) the values, each split into heads of d_head consecutive columns. The scale is the module's own
  ``scaling`` (``scale_attn_weights`` and ``scale_attn_by_inverse_layer_idx`` folded in). Absolute positions.
- GPT-NeoX: ``query_key_value`` [3d, d] is laid out per head: rows viewed [n_heads, 3 * d_head, d] hold head h's
  query, key and value rows in that order. Partial rotary: only the first ``rotary_dim = partial_rotary_factor *
  d_head`` dims of q and k rotate.
- BERT: ``attention.self.query/key/value`` and ``attention.output.dense``; bidirectional (unless ``is_decoder``),
  absolute positions.

RoPE (``RopeSpec``) keeps the rotary module's ``inv_freq`` (which already holds any frequency rescaling, e.g.
rope_type "llama3", "linear", "yarn") and ``attention_scaling``, and computes cos/sin exactly as the module's forward
does (float32 angles, ``cat(freqs, freqs)``, cast to the activations' dtype) and rotates with ``rotate_half``.
Sequence-length-dependent rope types ("dynamic", "longrope") change ``inv_freq`` at run time and are rejected.

Positions are ``arange(T)`` for every row, as Hugging Face uses when no ``position_ids`` are passed (also with
padding); pass ``position_ids`` to override. Query rows with no visible key (a left-padded position in a causal
model) get z = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ranklens.errors import RanklensError
from ranklens.lm.sites import Architecture, as_architecture

__all__ = [
    "MHSAWeights",
    "RMSNormSpec",
    "RopeSpec",
    "attention_allowed",
    "attention_probs",
    "attention_reference",
    "check_inputs",
    "default_positions",
    "mhsa_weights",
    "rms_norm",
]


# --------------------------------------------------------------------------------------------------------------------
# Positions and q/k norms
# --------------------------------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """Rotary position embedding exactly as a Hugging Face rotary module computes it (Lorsa paper, Appendix A).

    inv_freq: [rotary_dim // 2] float32, the module's (possibly rescaled) inverse frequencies.
    attention_scaling: the module's post-processing factor on cos/sin (1.0 except for e.g. yarn).
    rotary_dim: number of leading dims of each head that rotate (d_head, or less for GPT-NeoX's partial rotary).
    """

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    rope_type: str = "default"
    theta: float | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.inv_freq, torch.Tensor)
            or self.inv_freq.ndim != 1
            or self.inv_freq.numel() < 1
        ):
            raise RanklensError(
                f"RopeSpec inv_freq {getattr(self.inv_freq, 'shape', self.inv_freq)!r}: expected a non-empty 1-D tensor"
            )
        object.__setattr__(self, "inv_freq", self.inv_freq.detach().to(torch.float32))

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.numel())

    @classmethod
    def from_module(cls, module: nn.Module, theta: float | None = None, layer_type: str | None = None) -> RopeSpec:
        """From a Hugging Face rotary embedding module (``model.model.rotary_emb``).

        Gemma 3's module holds one set of frequencies per attention type (``rope_type`` is a dict such as
        {"sliding_attention": "default", "full_attention": "linear"}, buffers ``{layer_type}_inv_freq``, floats
        ``{layer_type}_attention_scaling``): pass the layer's ``layer_type`` to get that layer's rotation."""
        rope_type = getattr(module, "rope_type", "default")
        prefix = ""
        if isinstance(rope_type, dict):
            if layer_type not in rope_type:
                raise RanklensError(
                    f"{type(module).__name__} has per-layer rope types {rope_type!r}; expected a layer_type among "
                    f"{', '.join(map(repr, rope_type))}, got {layer_type!r}"
                )
            rope_type, prefix = rope_type[layer_type], f"{layer_type}_"
        if not isinstance(rope_type, str):
            raise RanklensError(f"rope_type {rope_type!r} is not supported; expected a string or a dict per layer type")
        if "dynamic" in rope_type or "longrope" in rope_type:
            raise RanklensError(
                f"rope_type {rope_type!r} changes its frequencies with the sequence length and is not supported; "
                "expected a static rope type (default, linear, llama3, yarn, ...)"
            )
        inv_freq = getattr(module, f"{prefix}inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor):
            raise RanklensError(
                f"{type(module).__name__} has no {prefix}inv_freq buffer; expected a rotary embedding module"
            )
        return cls(
            inv_freq=inv_freq.detach().float().clone(),
            attention_scaling=float(getattr(module, f"{prefix}attention_scaling", 1.0)),
            rope_type=rope_type,
            theta=theta,
        )

    def cos_sin(
        self, position_ids: torch.Tensor, dtype: torch.dtype, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., T, rotary_dim] for integer positions [..., T], as the model's rotary module computes them."""
        inv_freq = self.inv_freq.to(device=device or position_ids.device, dtype=torch.float32)
        freqs = position_ids.to(inv_freq.device)[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first rotary_dim dims of x [..., T, d_head] (cos/sin broadcastable to [..., T, rotary_dim])."""
        rd = self.rotary_dim
        if rd > x.shape[-1]:
            raise RanklensError(f"rotary_dim {rd} exceeds the head dimension {x.shape[-1]}; expected <= it")
        if rd == x.shape[-1]:
            return x * cos + _rotate_half(x) * sin
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)

    def to_dict(self) -> dict:
        return {
            "inv_freq": [float(f) for f in self.inv_freq.tolist()],
            "attention_scaling": self.attention_scaling,
            "rope_type": self.rope_type,
            "theta": self.theta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RopeSpec:
        return cls(
            inv_freq=torch.tensor(d["inv_freq"], dtype=torch.float32),
            attention_scaling=float(d.get("attention_scaling", 1.0)),
            rope_type=str(d.get("rope_type", "default")),
            theta=d.get("theta"),
        )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    upcast: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(offset + weight) * x / sqrt(mean(x^2) + eps) over the last dim, computed like Qwen3RMSNorm: normalized in
    ``upcast`` (float32, also for float64 inputs, as the model does), cast back, then scaled by the weight."""
    h = x.to(upcast)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = weight if offset == 0.0 else weight + offset
    return w.to(x.dtype) * h.to(x.dtype)


@dataclass(frozen=True, eq=False)
class RMSNormSpec:
    """A per-head RMSNorm on q or k (Qwen3's ``q_norm``/``k_norm``: weight [d_head] shared by all heads)."""

    weight: torch.Tensor
    eps: float
    offset: float = 0.0  # 1.0 for Gemma-style (1 + w) norms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)

    @classmethod
    def from_module(cls, module: nn.Module) -> RMSNormSpec:
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not isinstance(weight, torch.Tensor) or eps is None:
            raise RanklensError(
                f"q/k norm {type(module).__name__} is not supported; expected an RMSNorm with weight and eps"
            )
        offset = 1.0 if "Gemma" in type(module).__name__ else 0.0
        return cls(weight=weight.detach().clone(), eps=float(eps), offset=offset)


# --------------------------------------------------------------------------------------------------------------------
# The weights
# --------------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class MHSAWeights:
    """One MHSA layer of a supported model as plain (detached, copied) tensors; see the module docstring."""

    family: str
    model_type: str
    layer: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    W_Q: torch.Tensor  # [n_heads, d_head, d]
    b_Q: torch.Tensor | None  # [n_heads, d_head]
    W_K: torch.Tensor  # [n_kv_heads, d_head, d]
    b_K: torch.Tensor | None
    W_V: torch.Tensor  # [n_kv_heads, d_head, d]
    b_V: torch.Tensor | None
    W_O: torch.Tensor  # [d, n_heads * d_head]
    b_O: torch.Tensor | None  # [d]
    scale: float
    causal: bool
    positions: RopeSpec | None = None
    q_norm: RMSNormSpec | None = None
    k_norm: RMSNormSpec | None = None
    sliding_window: int | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        H, Hkv, dh, d = self.n_heads, self.n_kv_heads, self.d_head, self.d_model
        if H < 1 or Hkv < 1 or H % Hkv:
            raise RanklensError(f"n_kv_heads {Hkv} does not divide n_heads {H}; expected a divisor")
        expect = {
            "W_Q": (H, dh, d),
            "b_Q": (H, dh),
            "W_K": (Hkv, dh, d),
            "b_K": (Hkv, dh),
            "W_V": (Hkv, dh, d),
            "b_V": (Hkv, dh),
            "W_O": (d, H * dh),
            "b_O": (d,),
        }
        for name, shape in expect.items():
            t = getattr(self, name)
            if t is None and name.startswith("b_"):
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else t
                raise RanklensError(f"MHSAWeights.{name} has shape {got}; expected {shape}")
        if self.positions is not None and self.positions.rotary_dim > dh:
            raise RanklensError(
                f"rotary_dim {self.positions.rotary_dim} exceeds d_head {dh}; expected <= d_head"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_group(self, h: int) -> int:
        """The KV head that query head h reads (GQA: consecutive query heads share one)."""
        if not 0 <= h < self.n_heads:
            raise RanklensError(f"head {h} is out of range; expected 0..{self.n_heads - 1}")
        return h // self.group_size

    def W_O_head(self, h: int) -> torch.Tensor:
        """Head h's slice of W_O, [d, d_head] (Linear layout: o_h = z_h @ W_O_head(h).T)."""
        return self.W_O[:, h * self.d_head : (h + 1) * self.d_head]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_Q.dtype

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> MHSAWeights:
        """A copy with every tensor moved/cast (RoPE frequencies stay float32, as in the model)."""

        def cv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        def cn(n: RMSNormSpec | None) -> RMSNormSpec | None:
            return None if n is None else replace(n, weight=cv(n.weight))

        return replace(
            self,
            **{n: cv(getattr(self, n)) for n in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")},
            q_norm=cn(self.q_norm),
            k_norm=cn(self.k_norm),
        )


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def _heads(weight: torch.Tensor, n: int, dh: int) -> torch.Tensor:
    """Linear weight [n * dh, d] -> [n, dh, d]."""
    return weight.detach().reshape(n, dh, weight.shape[-1]).clone()


def _bias_heads(bias: torch.Tensor | None, n: int, dh: int) -> torch.Tensor | None:
    return None if bias is None else bias.detach().reshape(n, dh).clone()


def mhsa_weights(model: nn.Module | Architecture, layer: int) -> MHSAWeights:
    """The attention of `layer` of a Hugging Face model of a supported family (or its Architecture), as an
    ``MHSAWeights``."""
    arch = as_architecture(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < arch.n_layers:
        raise RanklensError(f"layer {layer!r} is out of range; expected an int in 0..{arch.n_layers - 1}")
    block = arch.layers[layer]
    config = arch.base_model.config
    H, Hkv, dh, d = arch.n_heads, arch.n_kv_heads, arch.d_head, arch.d_model
    W_O, b_O = arch.output_projection(layer)
    positions: RopeSpec | None = None
    q_norm = k_norm = None
    sliding_window: int | None = None
    softcap: float | None = None
    rope_params = getattr(config, "rope_parameters", None) or {}
    # Gemma 3 keeps one rope setting per attention type ("sliding_attention" layers theta 1e4, "full_attention"
    # layers 1e6 with its own scaling); the layer's attention module names its type.
    layer_type = getattr(getattr(block, "self_attn", None), "layer_type", None)
    if isinstance(rope_params, dict) and isinstance(rope_params.get(layer_type), dict):
        rope_params = rope_params[layer_type]
    else:
        layer_type = None
    theta = rope_params.get("rope_theta") if isinstance(rope_params, dict) else None

    if arch.family == "llama":
        attn = block.self_attn
        W_Q, b_Q = _heads(attn.q_proj.weight, H, dh), _bias_heads(attn.q_proj.bias, H, dh)
        W_K, b_K = _heads(attn.k_proj.weight, Hkv, dh), _bias_heads(attn.k_proj.bias, Hkv, dh)
        W_V, b_V = _heads(attn.v_proj.weight, Hkv, dh), _bias_heads(attn.v_proj.bias, Hkv, dh)
        positions = RopeSpec.from_module(arch.base_model.rotary_emb, theta=theta, layer_type=layer_type)
        if getattr(attn, "q_norm", None) is not None:
            q_norm = RMSNormSpec.from_module(attn.q_norm)
            k_norm = RMSNormSpec.from_module(attn.k_norm)
        if arch.model_type == "mistral":  # every layer; the mask is built from config.sliding_window
            sliding_window = getattr(config, "sliding_window", None)
        else:  # Qwen2/Qwen3/Gemma 2/Gemma 3: set on the module for "sliding_attention" layers only
            sliding_window = getattr(attn, "sliding_window", None)
        softcap = getattr(attn, "attn_logit_softcapping", None)
        scale = float(getattr(attn, "scaling", dh**-0.5))
        causal = bool(getattr(attn, "is_causal", True))
    elif arch.family == "gpt2":
        attn = block.attn
        w = attn.c_attn.weight.detach()  # Conv1D [d, 3d]: y = x @ w + b
        b = attn.c_attn.bias.detach() if attn.c_attn.bias is not None else None
        W_Q = _heads(w[:, :d].T, H, dh)
        W_K = _heads(w[:, d : 2 * d].T, H, dh)
        W_V = _heads(w[:, 2 * d :].T, H, dh)
        b_Q, b_K, b_V = (
            (None, None, None)
            if b is None
            else tuple(_bias_heads(b[i * d : (i + 1) * d], H, dh) for i in range(3))
        )
        scale = float(attn.scaling)
        causal = bool(getattr(attn, "is_causal", True))
    elif arch.family == "gpt_neox":
        attn = block.attention
        qkv = attn.query_key_value.weight.detach().reshape(H, 3 * dh, d)
        W_Q, W_K, W_V = (qkv[:, i * dh : (i + 1) * dh].clone() for i in range(3))
        if attn.query_key_value.bias is not None:
            qkv_b = attn.query_key_value.bias.detach().reshape(H, 3 * dh)
            b_Q, b_K, b_V = (qkv_b[:, i * dh : (i + 1) * dh].clone() for i in range(3))
        else:
            b_Q = b_K = b_V = None
        positions = RopeSpec.from_module(arch.base_model.rotary_emb, theta=theta)
        scale = float(getattr(attn, "scaling", dh**-0.5))
        causal = bool(getattr(attn, "is_causal", True))
    elif arch.family == "bert":
        attn = block.attention.self
        W_Q, b_Q = _heads(attn.query.weight, H, dh), _bias_heads(attn.query.bias, H, dh)
        W_K, b_K = _heads(attn.key.weight, H, dh), _bias_heads(attn.key.bias, H, dh)
        W_V, b_V = _heads(attn.value.weight, H, dh), _bias_heads(attn.value.bias, H, dh)
        scale = float(getattr(attn, "scaling", dh**-0.5))
        causal = bool(getattr(attn, "is_causal", False))
    else:  # pragma: no cover - describe() rejects other families
        raise RanklensError(
            f"family {arch.family!r} has no attention mapping; expected llama, gpt2, gpt_neox or bert"
        )

    return MHSAWeights(
        family=arch.family,
        model_type=arch.model_type,
        layer=layer,
        d_model=d,
        n_heads=H,
        n_kv_heads=Hkv,
        d_head=dh,
        W_Q=W_Q,
        b_Q=b_Q,
        W_K=W_K,
        b_K=b_K,
        W_V=W_V,
        b_V=b_V,
        W_O=W_O.detach().clone(),
        b_O=_c(b_O),
        scale=scale,
        causal=causal,
        positions=positions,
        q_norm=q_norm,
        k_norm=k_norm,
        sliding_window=None if sliding_window is None else int(sliding_window),
        softcap=None if softcap is None else float(softcap),
    )


# --------------------------------------------------------------------------------------------------------------------
# Masks and the reference implementation
# --------------------------------------------------------------------------------------------------------------------


def check_inputs(
    x: torch.Tensor, d_model: int, attention_mask: torch.Tensor | None, what: str
) -> tuple[int, int]:
    """Validate x [B, T, d_model] and attention_mask [B, T]; returns (B, T)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != d_model:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise RanklensError(f"{what}: input of shape {shape}; expected [batch, seq, d_model={d_model}]")
    B, T = x.shape[0], x.shape[1]
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T)
    ):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
        raise RanklensError(f"{what}: attention_mask of shape {shape}; expected [batch, seq] = {(B, T)}")
    return B, T


def default_positions(
    B: int, T: int, position_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Position ids [B, T]: arange(T) per row unless given ([T] or [B, T])."""
    if position_ids is None:
        return torch.arange(T, device=device).expand(B, T)
    if position_ids.shape[-1] != T or position_ids.ndim not in (1, 2):
        raise RanklensError(
            f"position_ids of shape {tuple(position_ids.shape)}; expected [seq] or [batch, seq]"
        )
    return position_ids.to(device).expand(B, T)


def attention_allowed(
    T: int,
    attention_mask: torch.Tensor | None,
    causal: bool,
    sliding_window: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Bool [B or 1, T, T]: key j is visible from query i (padding: attention_mask[b, j] != 0; causal: j <= i;
    sliding window: i - j < window). None when everything is visible."""
    allowed: torch.Tensor | None = None
    i = torch.arange(T, device=device)
    if causal or sliding_window is not None:
        diff = i[:, None] - i[None, :]  # i - j
        pos = torch.ones(T, T, dtype=torch.bool, device=device)
        if causal:
            pos &= diff >= 0
        if sliding_window is not None:
            pos &= diff < sliding_window
        allowed = pos[None]
    if attention_mask is not None:
        keys = attention_mask.to(device=device).bool()[:, None, :]  # [B, 1, T]
        allowed = keys.expand(-1, T, -1) if allowed is None else allowed & keys
    return allowed


def attention_probs(
    w: MHSAWeights,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every head's attention pattern A [B, n_heads, T, T] (row i: the weights query i gives each key), computed
    naively from the weights as the module docstring writes it. Rows with no visible key are zero."""
    B, T = check_inputs(x, w.d_model, attention_mask, "attention_probs")
    w = w.to(dtype=x.dtype, device=x.device)
    allowed = attention_allowed(T, attention_mask, w.causal, w.sliding_window, x.device)
    cos = sin = None
    if w.positions is not None:
        pos = default_positions(B, T, position_ids, x.device)
        cos, sin = w.positions.cos_sin(pos, x.dtype, x.device)  # [B, T, rotary_dim]
    patterns = []
    for h in range(w.n_heads):
        g = w.kv_group(h)
        q = x @ w.W_Q[h].T + (0 if w.b_Q is None else w.b_Q[h])  # [B, T, dh]
        k = x @ w.W_K[g].T + (0 if w.b_K is None else w.b_K[g])
        if w.q_norm is not None:
            q = w.q_norm(q)
        if w.k_norm is not None:
            k = w.k_norm(k)
        if w.positions is not None:
            q = w.positions.apply(q, cos, sin)
            k = w.positions.apply(k, cos, sin)
        s = (q @ k.transpose(-1, -2)) * w.scale  # [B, T, T]
        if w.softcap is not None:
            s = torch.tanh(s / w.softcap) * w.softcap
        if allowed is not None:
            s = s.masked_fill(~allowed, -math.inf)
        a = torch.softmax(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1).to(x.dtype)
        patterns.append(torch.nan_to_num(a, nan=0.0))  # rows with no visible key
    return torch.stack(patterns, dim=1)


def attention_reference(
    w: MHSAWeights,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive MHSA from its weights, one head at a time: returns (attn_out [B, T, d], attn_z [B, T, n_heads*d_head]).

    x is the attention input (site ``attn_in``). Written for clarity, not speed: the check that ``MHSAWeights`` means
    what the model computes, and the reference the Lorsa exact decomposition is tested against."""
    a = attention_probs(w, x, attention_mask, position_ids)  # [B, H, T, T]
    w = w.to(dtype=x.dtype, device=x.device)
    zs = []
    for h in range(w.n_heads):
        g = w.kv_group(h)
        v = x @ w.W_V[g].T + (0 if w.b_V is None else w.b_V[g])
        zs.append(a[:, h] @ v)
    z = torch.cat(zs, dim=-1)
    out = z @ w.W_O.T
    if w.b_O is not None:
        out = out + w.b_O
    return out, z
