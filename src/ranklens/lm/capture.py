"""Capture activations at sites with plain forward hooks, stopping the forward pass as soon as all are read.

    capturer = Capturer(model, "L*.attn_out,L3.mlp_out")       # or a list of Site / site names
    acts = capturer(input_ids, attention_mask)                  # {"L0.attn_out": Tensor[batch, seq, d], ...}

    with Capturer(model, sites) as capture:                     # hooks registered once for many batches
        for ids, mask in batches:
            acts = capture(ids, mask)

One forward of `arch.base_model` per call, under `torch.inference_mode()` (or `torch.no_grad()` with
`inference_mode=False`, for activations that will be saved for backward by an autograd graph later: inference tensors
cannot be). Hooks are registered for the call (or the `with` block) and always removed, also when the forward
raises; inside a `with` block they do nothing outside the capturer's own calls. Once every requested
site has been read, the hook raises a private exception that `Capturer.__call__` catches, so nothing after the deepest
needed module runs: no later layers, no final norm, no LM head (the wrapper model's head is never called at all, since
the forward goes through the base model).

Captured tensors are the module's own outputs/inputs, detached, in the model's dtype, without copies: none of the
supported families mutates these tensors in place afterwards. The model should be in eval mode (dropout).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ranklens.errors import RanklensError
from ranklens.lm.sites import Architecture, HookPoint, Site, as_architecture, parse_sites


class _StopForward(Exception):
    """Raised from a hook once every requested site is captured; caught by the capturer."""


SiteSpec = str | Site | Iterable[str | Site]


def resolve_sites(arch: Architecture, sites: SiteSpec) -> list[Site]:
    """Sites from a pattern string (`"L*.attn_out,L3.mlp_out"`), a Site, or an iterable of Sites / site names;
    checked against the model, sorted and deduplicated."""
    if isinstance(sites, str):
        out = parse_sites(sites, arch.n_layers)
    elif isinstance(sites, Site):
        out = [sites]
    else:
        out = []
        for s in sites:
            if isinstance(s, Site):
                out.append(s)
            elif isinstance(s, str):
                out.extend(parse_sites(s, arch.n_layers))
            else:
                raise RanklensError(f"site {s!r} has type {type(s).__name__}; expected a Site or a site name")
    if not out:
        raise RanklensError("no sites requested; expected at least one site, e.g. 'L0.attn_out'")
    for s in out:
        arch.check_site(s)
    return sorted(set(out))


class _State:
    """What the hooks of one Capturer share: the store of the call in progress (None between calls)."""

    __slots__ = ("store", "n_total")

    def __init__(self, n_total: int) -> None:
        self.store: dict[str, torch.Tensor] | None = None
        self.n_total = n_total


def _save(state: _State, names: tuple[str, ...], t: torch.Tensor) -> None:
    store = state.store
    # Not inside a capture call (inert hooks in a `with` block), or a module called twice: keep the first call.
    if store is None or names[0] in store:
        return
    t = t.detach()
    for name in names:
        store[name] = t
    if len(store) == state.n_total:
        raise _StopForward


def _output_hook(state: _State, names: tuple[str, ...]):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        _save(state, names, output[0] if isinstance(output, tuple) else output)

    return hook


def _input_hook(state: _State, names: tuple[str, ...]):
    # with_kwargs=True: decoder layers may receive hidden_states as a keyword argument.
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        _save(state, names, args[0] if args else kwargs["hidden_states"])

    return hook


class Capturer:
    """Reads the activations of `sites` of a Hugging Face model in one (early-stopped) forward pass per call.

    Call it directly (hooks are registered for that call and removed after it), or use it as a context manager
    to keep the hooks registered across many calls (they are removed on exit, and stay inert outside calls, so
    other forwards of the model inside the block are unaffected):

        with Capturer(model, "L*.attn_out") as capture:
            for ids, mask in batches:
                acts = capture(ids, mask)
    """

    def __init__(self, model: nn.Module | Architecture, sites: SiteSpec, *, inference_mode: bool = True) -> None:
        self.arch = as_architecture(model)
        self.sites: tuple[Site, ...] = tuple(resolve_sites(self.arch, sites))
        self.names: tuple[str, ...] = tuple(s.name for s in self.sites)
        self.last_layer: int = max(s.layer for s in self.sites)
        self.inference_mode = inference_mode
        # One hook per (module, side); sites that share a tensor (BERT's resid_pre and attn_in) share the hook.
        groups: dict[tuple[int, HookPoint], tuple[nn.Module, HookPoint, list[str]]] = {}
        for s in self.sites:
            module, point = self.arch.hook_point(s)
            groups.setdefault((id(module), point), (module, point, []))[2].append(s.name)
        self._plan = [(m, p, tuple(names)) for m, p, names in groups.values()]
        self._state = _State(len(self.names))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _register(self) -> None:
        try:
            for module, point, names in self._plan:
                if point == "input":
                    h = module.register_forward_pre_hook(_input_hook(self._state, names), with_kwargs=True)
                else:
                    h = module.register_forward_hook(_output_hook(self._state, names))
                self._handles.append(h)
        except BaseException:
            self._remove()
            raise

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Capturer:
        if self._handles:
            raise RuntimeError("this Capturer is already active; a Capturer can be entered once at a time")
        self._register()
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Returns {site name: Tensor[batch, seq, site_dim]} in the order of `self.sites`."""
        if self._state.store is not None:
            raise RuntimeError("Capturer called re-entrantly (from inside its own forward pass)")
        temporary = not self._handles
        store: dict[str, torch.Tensor] = {}
        try:
            if temporary:
                self._register()
            self._state.store = store
            _run_base(self.arch, input_ids, attention_mask, self.inference_mode)
        finally:
            self._state.store = None
            if temporary:
                self._remove()
        if len(store) != len(self.names):
            missing = [n for n in self.names if n not in store]
            raise RuntimeError(f"the forward pass finished without reaching sites {missing}")
        return {name: store[name] for name in self.names}


def capture(
    model: nn.Module,
    sites: SiteSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    inference_mode: bool = True,
) -> dict[str, torch.Tensor]:
    """One-shot `Capturer(model, sites)(input_ids, attention_mask)`."""
    return Capturer(model, sites, inference_mode=inference_mode)(input_ids, attention_mask)


def _run_base(
    arch: Architecture, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, inference_mode: bool
) -> Any:
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if arch.accepts_use_cache:
        kwargs["use_cache"] = False
    with torch.inference_mode() if inference_mode else torch.no_grad():
        try:
            return arch.base_model(**kwargs)
        except _StopForward:
            return None


def _owner(root: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for name, module in root.named_modules():
        if module is target and name:
            parent, _, attr = name.rpartition(".")
            return root.get_submodule(parent), attr
    raise RuntimeError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def truncated_forward(
    model: nn.Module | Architecture,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    last_layer: int | None = None,
) -> torch.Tensor:
    """A bare forward (no hooks) through layers 0..last_layer only: the reference for capture benchmarks.

    Returns the residual stream after `last_layer` ([batch, seq, d_model]; equals capture of `L{last_layer}.resid_post`).
    Works by temporarily swapping in a truncated layer list and an identity final norm (BERT: no pooler), so it is not
    safe to run concurrently with other uses of the same model object."""
    arch = as_architecture(model)
    last = arch.n_layers - 1 if last_layer is None else last_layer
    arch.check_site(Site(last, "resid_post"))
    base = arch.base_model
    layers_owner, layers_attr = _owner(base, arch.layers)
    swaps: list[tuple[nn.Module, str, nn.Module | None]] = [
        (layers_owner, layers_attr, nn.ModuleList(list(arch.layers)[: last + 1]))
    ]
    if arch.final_norm is not None:
        swaps.append((*_owner(base, arch.final_norm), nn.Identity()))
    if getattr(base, "pooler", None) is not None:
        swaps.append((base, "pooler", None))
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in swaps]
    try:
        for owner, attr, new in swaps:
            setattr(owner, attr, new)
        out = _run_base(arch, input_ids, attention_mask, inference_mode=True)
    finally:
        for owner, attr, old in saved:
            setattr(owner, attr, old)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state
