"""Activation sites: names, patterns, and where each one lives in every supported architecture family.

A site is `L{layer}.{kind}` with a kind from `KINDS`:

- `resid_pre`   the residual stream entering the block (the block's input).
- `attn_in`     the normalized input the attention reads (for post-LN BERT: the block input itself).
- `attn_z`      Z = Concat[Z_1, ..., Z_H], the head outputs before the output projection (paper Sec. 3.1),
                dimension n_heads * d_head.
- `attn_out`    O = Z W^O (+ bias): the output projection's output, before dropout, residual add or any norm.
- `mlp_in`      the normalized input the MLP reads.
- `mlp_hidden`  the input of the MLP's down projection, dimension d_mlp.
- `mlp_out`     the MLP's output, before the residual add or any norm.
- `resid_post`  the residual stream leaving the block (the block's output).

Per-head outputs O_i = Z_i W^O_i are derived from `attn_z` and the output projection (`per_head_outputs`), never hooked.

Families and their residual arithmetic (all checked in tests/test_capture.py against the model's own modules):

- `llama` (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3): pre-LN, sequential.
  resid_post = resid_pre + attn_out + mlp_out, attn_in = input_layernorm(resid_pre),
  mlp_in = post_attention_layernorm(resid_pre + attn_out).
  Gemma 2 and Gemma 3 (`gemma3_text`) have "sandwich" norms: post_attention_layernorm acts on the attention output and post_feedforward_layernorm on
  the MLP output before the residual adds. attn_out and mlp_out stay the raw projections (the paper's O = Z W^O), so
  resid_mid = resid_pre + post_attention_layernorm(attn_out), mlp_in = pre_feedforward_layernorm(resid_mid),
  resid_post = resid_mid + post_feedforward_layernorm(mlp_out). Gemma's RMSNorms scale by (1 + weight), so the
  arithmetic holds with the modules themselves, never with a bare `weight * x / rms(x)`.
- `gpt2`: pre-LN, sequential, weights in Conv1D layout ([in, out]); `output_projection` returns them Linear-style.
- `gpt_neox` (Pythia): pre-LN; with `use_parallel_residual` both branches read resid_pre:
  resid_post = resid_pre + attn_out + mlp_out and mlp_in = post_attention_layernorm(resid_pre); otherwise sequential.
- `bert`: post-LN. attn_in = resid_pre; mlp_in = attention.output.LayerNorm(resid_pre + attn_out);
  resid_post = output.LayerNorm(mlp_in + mlp_out).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ranklens.errors import RanklensError

KINDS: tuple[str, ...] = (
    "resid_pre",
    "attn_in",
    "attn_z",
    "attn_out",
    "mlp_in",
    "mlp_hidden",
    "mlp_out",
    "resid_post",
)
_KIND_ORDER = {kind: i for i, kind in enumerate(KINDS)}

HookPoint = Literal["input", "output"]

_SYNTAX = (
    "L{layer}.{kind}, with layer an integer, an inclusive range like 10-20, * (every layer) or mid (layer "
    "n_layers // 2, the paper's middle layer), and kind one of "
    f"{', '.join(KINDS)} or * (e.g. 'L15.attn_out', 'L*.mlp_out', 'L10-20.*'); separate several with commas"
)


@dataclass(frozen=True, order=True)
class Site:
    """One activation site, `L{layer}.{kind}`. Sites sort by layer, then by the kind's position in `KINDS`."""

    layer: int
    # Hidden sort key between layer and kind, so that ordering follows the forward pass rather than the alphabet.
    _order: int = field(init=False, repr=False, default=0)
    kind: str

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise RanklensError(f"site layer {self.layer!r} is invalid; expected a non-negative integer")
        if self.kind not in _KIND_ORDER:
            raise RanklensError(f"unknown site kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        object.__setattr__(self, "_order", _KIND_ORDER[self.kind])

    @property
    def name(self) -> str:
        return f"L{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> Site:
        """Parse one exact site name such as `L15.attn_out` (no wildcards or ranges)."""
        m = re.fullmatch(r"L(\d+)\.(.+)", name.strip())
        if m is None:
            raise RanklensError(
                f"malformed site name {name!r}; expected L{{layer}}.{{kind}}, e.g. 'L15.attn_out'"
            )
        kind = m.group(2)
        if kind not in _KIND_ORDER:
            raise RanklensError(f"unknown site kind {kind!r} in {name!r}; expected one of {', '.join(KINDS)}")
        return cls(int(m.group(1)), kind)


_PATTERN = re.compile(r"L(?P<layers>[^.]*)\.(?P<kind>\*|\w+)")
_LAYER_SPEC = re.compile(r"(?P<all>\*)|(?P<mid>mid)|(?P<one>\d+)|(?P<lo>\d+)-(?P<hi>\d+)")


def parse_sites(pattern: str, n_layers: int) -> list[Site]:
    """Expand comma-separated site patterns (`L*.attn_out`, `L10-20.mlp_out`, `L3.*`, `Lmid.attn_out`) for a model
    with `n_layers` layers. Returns the sites sorted by (layer, kind order in KINDS), without duplicates."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise RanklensError(f"n_layers {n_layers!r} is invalid; expected a positive integer")
    if not isinstance(pattern, str) or not pattern.strip():
        raise RanklensError(f"empty site pattern {pattern!r}; expected {_SYNTAX}")
    out: set[Site] = set()
    for part in pattern.split(","):
        part = part.strip()
        m = _PATTERN.fullmatch(part)
        spec = _LAYER_SPEC.fullmatch(m.group("layers")) if m else None
        if m is None or spec is None:
            raise RanklensError(f"malformed site pattern {part!r}; expected {_SYNTAX}")
        kind = m.group("kind")
        if kind == "*":
            kinds = KINDS
        elif kind in _KIND_ORDER:
            kinds = (kind,)
        else:
            raise RanklensError(
                f"unknown site kind {kind!r} in {part!r}; expected one of {', '.join(KINDS)} or *"
            )
        if spec.group("all"):
            layers = range(n_layers)
        elif spec.group("mid"):
            layers = range(n_layers // 2, n_layers // 2 + 1)
        else:
            if spec.group("one") is not None:
                lo = hi = int(spec.group("one"))
            else:
                lo, hi = int(spec.group("lo")), int(spec.group("hi"))
                if lo > hi:
                    raise RanklensError(
                        f"layer range {lo}-{hi} in {part!r} is empty; expected start <= end, e.g. L{hi}-{lo}.{kind}"
                    )
            if hi >= n_layers:
                raise RanklensError(
                    f"layer {hi} in {part!r} is out of range: the model has {n_layers} layers "
                    f"(valid 0..{n_layers - 1})"
                )
            layers = range(lo, hi + 1)
        out.update(Site(layer, k) for layer in layers for k in kinds)
    return sorted(out)


# --------------------------------------------------------------------------------------------------------------------
# Architecture families
# --------------------------------------------------------------------------------------------------------------------

_LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# model_type -> family
_FAMILIES: dict[str, str] = {t: "llama" for t in _LLAMA_TYPES} | {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "bert": "bert",
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)
# Llama-family model types whose blocks normalize each branch's output before the residual add (Gemma 2 and 3).
SANDWICH_NORM_TYPES = frozenset({"gemma2", "gemma3_text"})


@dataclass(eq=False)
class Architecture:
    """Where every site of one loaded Hugging Face model lives. Build with `describe(model)`."""

    family: str  # "llama" | "gpt2" | "gpt_neox" | "bert"
    model_type: str  # config.model_type, e.g. "qwen3"
    causal: bool
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    layers: nn.ModuleList
    base_model: nn.Module  # forward(input_ids=..., attention_mask=...) -> hidden states
    final_norm: nn.Module | None  # applied after the last block (None for BERT)
    parallel_residual: bool  # GPT-NeoX with use_parallel_residual
    accepts_use_cache: bool  # base_model.forward takes use_cache (capture passes use_cache=False)

    # ---- sizes -------------------------------------------------------------------------------------------------

    def site_dim(self, site: Site) -> int:
        if site.kind == "attn_z":
            return self.n_heads * self.d_head
        if site.kind == "mlp_hidden":
            return self.d_mlp
        return self.d_model

    def sites(self) -> list[tuple[Site, int]]:
        """Every site of every layer with its dimension, as (site, dim) pairs in forward order."""
        all_sites = [Site(layer, kind) for layer in range(self.n_layers) for kind in KINDS]
        return [(s, self.site_dim(s)) for s in all_sites]

    def parse(self, pattern: str) -> list[Site]:
        return parse_sites(pattern, self.n_layers)

    def site(self, name: str) -> Site:
        """Exactly one site from a name or a one-site pattern (`L15.attn_out`, `Lmid.attn_out`), checked against
        this model's layers."""
        sites = parse_sites(name, self.n_layers)
        if len(sites) != 1:
            raise RanklensError(f"{name!r} names {len(sites)} sites; expected exactly one, e.g. 'L15.attn_out' or "
                                "'Lmid.attn_out'")
        return sites[0]

    def check_site(self, site: Site) -> None:
        if site.layer >= self.n_layers:
            raise RanklensError(
                f"site {site.name} is out of range: the model has {self.n_layers} layers "
                f"(valid 0..{self.n_layers - 1})"
            )

    # ---- hooks -------------------------------------------------------------------------------------------------

    def hook_point(self, site: Site) -> tuple[nn.Module, HookPoint]:
        """The module and the side ("input": first positional argument or `hidden_states` kwarg of its forward;
        "output": its output, or element 0 if it returns a tuple) at which `site` is read."""
        self.check_site(site)
        block = self.layers[site.layer]
        return _HOOKS[self.family](self, block, site.kind)

    def output_projection(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_O of `layer` in Linear layout [d_model, n_heads * d_head] (so attn_out = attn_z @ W_O.T + b) and its
        bias [d_model] or None. Views of the parameters (GPT-2's Conv1D weight is transposed)."""
        self.check_site(Site(layer, "attn_out"))
        proj, _ = self.hook_point(Site(layer, "attn_out"))
        if self.family == "gpt2":  # transformers Conv1D: y = x @ weight + bias, weight [in, out]
            return proj.weight.T, proj.bias
        return proj.weight, proj.bias


def _llama_hooks(arch: Architecture, block: nn.Module, kind: str) -> tuple[nn.Module, HookPoint]:
    attn, mlp = block.self_attn, block.mlp
    if kind == "mlp_in":
        norm = (
            block.pre_feedforward_layernorm
            if arch.model_type in SANDWICH_NORM_TYPES
            else block.post_attention_layernorm
        )
        return norm, "output"
    return {
        "resid_pre": (block, "input"),
        "attn_in": (block.input_layernorm, "output"),
        "attn_z": (attn.o_proj, "input"),
        "attn_out": (attn.o_proj, "output"),
        "mlp_hidden": (mlp.down_proj, "input"),
        "mlp_out": (mlp, "output"),
        "resid_post": (block, "output"),
    }[kind]


def _gpt2_hooks(arch: Architecture, block: nn.Module, kind: str) -> tuple[nn.Module, HookPoint]:
    return {
        "resid_pre": (block, "input"),
        "attn_in": (block.ln_1, "output"),
        "attn_z": (block.attn.c_proj, "input"),
        "attn_out": (block.attn.c_proj, "output"),
        "mlp_in": (block.ln_2, "output"),
        "mlp_hidden": (block.mlp.c_proj, "input"),
        "mlp_out": (block.mlp, "output"),
        "resid_post": (block, "output"),
    }[kind]


def _neox_hooks(arch: Architecture, block: nn.Module, kind: str) -> tuple[nn.Module, HookPoint]:
    return {
        "resid_pre": (block, "input"),
        "attn_in": (block.input_layernorm, "output"),
        "attn_z": (block.attention.dense, "input"),
        "attn_out": (block.attention.dense, "output"),
        "mlp_in": (block.post_attention_layernorm, "output"),
        "mlp_hidden": (block.mlp.dense_4h_to_h, "input"),
        "mlp_out": (block.mlp, "output"),
        "resid_post": (block, "output"),
    }[kind]


def _bert_hooks(arch: Architecture, block: nn.Module, kind: str) -> tuple[nn.Module, HookPoint]:
    return {
        "resid_pre": (block, "input"),
        "attn_in": (block, "input"),  # post-LN: the attention reads the block input directly
        "attn_z": (block.attention.output.dense, "input"),
        "attn_out": (block.attention.output.dense, "output"),  # before dropout, residual and LayerNorm
        "mlp_in": (block.intermediate, "input"),  # = attention.output.LayerNorm(resid_pre + attn_out)
        "mlp_hidden": (block.output.dense, "input"),
        "mlp_out": (block.output.dense, "output"),  # before dropout, residual and LayerNorm
        "resid_post": (block, "output"),
    }[kind]


_HOOKS = {"llama": _llama_hooks, "gpt2": _gpt2_hooks, "gpt_neox": _neox_hooks, "bert": _bert_hooks}


def describe(model: nn.Module) -> Architecture:
    """Resolve the architecture of a loaded Hugging Face model (a *ForCausalLM / *ForMaskedLM wrapper or the bare
    base model) by `config.model_type`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise RanklensError(
            f"{type(model).__name__} has no config.model_type; expected a Hugging Face transformers model"
        )
    family = _FAMILIES.get(model_type)
    if family is None:
        raise RanklensError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    base = getattr(model, "base_model", model)
    n_heads = int(config.num_attention_heads)

    if family == "llama":
        layers = base.layers
        block0 = layers[0]
        d_model = block0.self_attn.o_proj.out_features
        d_head = block0.self_attn.o_proj.in_features // n_heads
        n_kv_heads = int(getattr(config, "num_key_value_heads", None) or n_heads)
        d_mlp = block0.mlp.down_proj.in_features
        final_norm, causal, parallel = base.norm, True, False
    elif family == "gpt2":
        layers = base.h
        block0 = layers[0]
        d_model = block0.attn.c_proj.weight.shape[1]
        d_head = block0.attn.c_proj.weight.shape[0] // n_heads
        n_kv_heads = n_heads
        d_mlp = block0.mlp.c_proj.weight.shape[0]
        final_norm, causal, parallel = base.ln_f, True, False
    elif family == "gpt_neox":
        layers = base.layers
        block0 = layers[0]
        d_model = block0.attention.dense.out_features
        d_head = block0.attention.dense.in_features // n_heads
        n_kv_heads = n_heads
        d_mlp = block0.mlp.dense_4h_to_h.in_features
        final_norm, causal, parallel = base.final_layer_norm, True, bool(config.use_parallel_residual)
    else:  # bert
        layers = base.encoder.layer
        block0 = layers[0]
        d_model = block0.attention.output.dense.out_features
        d_head = block0.attention.output.dense.in_features // n_heads
        n_kv_heads = n_heads
        d_mlp = block0.output.dense.in_features
        final_norm, causal, parallel = None, bool(getattr(config, "is_decoder", False)), False

    accepts_use_cache = "use_cache" in inspect.signature(base.forward).parameters
    return Architecture(
        family=family,
        model_type=model_type,
        causal=causal,
        n_layers=len(layers),
        d_model=int(d_model),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_head=int(d_head),
        d_mlp=int(d_mlp),
        layers=layers,
        base_model=base,
        final_norm=final_norm,
        parallel_residual=parallel,
        accepts_use_cache=accepts_use_cache,
    )


def as_architecture(model: nn.Module | Architecture) -> Architecture:
    """The Architecture of a loaded model, or the Architecture itself (so callers that hold one pass it down)."""
    return model if isinstance(model, Architecture) else describe(model)


def per_head_outputs(z: torch.Tensor, W_O: torch.Tensor, n_heads: int) -> torch.Tensor:
    """O_i = Z_i W^O_i for every head i (paper Sec. 3.1), without the output bias.

    z: [..., n_heads * d_head] (an `attn_z` activation); W_O: [d_model, n_heads * d_head] (Linear layout, as returned
    by `Architecture.output_projection`). Returns [..., n_heads, d_model]; summing over heads and adding the bias gives
    `attn_out`."""
    hd = z.shape[-1]
    if W_O.ndim != 2 or W_O.shape[1] != hd:
        raise RanklensError(
            f"W_O shape {tuple(W_O.shape)} does not match attn_z width {hd}; expected [d_model, {hd}]"
        )
    if n_heads < 1 or hd % n_heads:
        raise RanklensError(
            f"n_heads {n_heads} does not divide attn_z width {hd}; expected a divisor of {hd}"
        )
    d_head = hd // n_heads
    z_heads = z.reshape(*z.shape[:-1], n_heads, d_head)  # [..., H, d_head]
    w_heads = W_O.reshape(W_O.shape[0], n_heads, d_head)  # [d_model, H, d_head]
    return torch.einsum("...hk,dhk->...hd", z_heads, w_heads.to(z.dtype))
