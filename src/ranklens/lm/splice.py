"""Replace a site's activation inside the running model (for spliced LM-loss evaluations).

`replace_site(arch, site, fn, positions)` registers, for the duration of a `with` block, a hook at the site's
hook point that swaps the activation x [batch, seq, d] for `fn(x[positions])` at the selected positions and
leaves the others (bos, eos, padding) untouched: a dictionary never sees those positions in training, so it is
not asked to reconstruct them. `fn` maps [n, d] -> [n, d] and runs on the selected rows only.

`replace_site_from(arch, source, target, fn, positions, attention_mask)` replaces `target` by a function of another
site read in the same forward pass, for replacements that need whole sequences (Lorsa reads `attn_in` at every
position and replaces `attn_out`). `SequenceSplice` packages one for `ranklens.eval.lm_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ranklens.lm.sites import Architecture, Site

RowMap = Callable[[torch.Tensor], torch.Tensor]
# (source [B, T, d_source], attention_mask [B, T]) -> replacement of the target [B, T, d_target]
SequenceMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _spliced(x: torch.Tensor, fn: RowMap, positions: torch.Tensor) -> torch.Tensor:
    rows = fn(x[positions])
    out = x.clone()
    out[positions] = rows.to(x.dtype)
    return out


def _hook(module: nn.Module, point: str, on_value: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register `on_value` at a hook point; it sees the activation and may return a replacement (or None)."""
    if point == "input":
        def input_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            new = on_value(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(input_hook, with_kwargs=True)

    def output_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        new = on_value(output[0] if isinstance(output, tuple) else output)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(output_hook)


def on_site(arch: Architecture, site: Site, on_value: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register `on_value` at `site`'s hook point until the returned handle is removed; it sees the activation
    [batch, seq, d] and may return a replacement (or None to keep it)."""
    return _hook(*arch.hook_point(site), on_value)


@contextmanager
def replace_site(arch: Architecture, site: Site, fn: RowMap, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, every forward of `arch`'s model sees `fn` applied at `site` on `positions` [B, T] bool."""
    handle = _hook(*arch.hook_point(site), lambda x: _spliced(x, fn, positions))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def replace_site_from(arch: Architecture, source: Site, target: Site, fn: SequenceMap, positions: torch.Tensor,
                      attention_mask: torch.Tensor) -> Iterator[None]:
    """Within the block, every forward replaces `target` at `positions` [B, T] bool by
    `fn(source activation, attention_mask)` [B, T, d], with the source read earlier in that same forward pass (so the
    replacement sees exactly what the model computed there, e.g. `attn_in` of the layer whose `attn_out` it replaces).
    The other positions keep the model's values."""
    seen: dict[str, torch.Tensor] = {}

    def read(x: torch.Tensor) -> None:
        seen["source"] = x

    def replace(x: torch.Tensor) -> torch.Tensor:
        if "source" not in seen:
            raise RuntimeError(f"{target.name} ran before {source.name}; expected the source earlier in the forward")
        new = fn(seen.pop("source"), attention_mask)
        out = x.clone()
        out[positions] = new[positions].to(x.dtype)
        return out

    handles = [_hook(*arch.hook_point(source), read)]
    try:
        handles.append(_hook(*arch.hook_point(target), replace))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class SequenceSplice:
    """A replacement of a site computed from `source` in the same forward pass, for `ranklens.eval.lm_loss`
    (`fn`: (source [B, T, d], attention_mask [B, T]) -> [B, T, d_site])."""

    source: Site
    fn: SequenceMap

    def splice(self, arch: Architecture, site: Site, batch) -> AbstractContextManager[None]:
        """The context replacing `site` at the ordinary positions of `batch` (a TokenBatch)."""
        return replace_site_from(arch, self.source, site, self.fn, batch.stat_mask, batch.attention_mask)


class _Passthrough(nn.Module):
    """Stands in for a decoder layer: returns its input hidden states, or a fixed tensor."""

    def __init__(self, output: torch.Tensor | None = None) -> None:
        super().__init__()
        self.output = output

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.output is None else self.output


@contextmanager
def skip_prefix(arch: Architecture, layer: int, resid_pre: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward skips layers 0..layer-1 and starts layer `layer` from `resid_pre`.

    The skipped layers are swapped for pass-throughs in place (the last one returns the cached `resid_pre`), so
    the model's own loop, masks, rotary embeddings and per-layer attention types (indexed by position in the layer
    list, as Gemma 2 and Qwen 3 do) are untouched. Loss curves that splice many replacements at one site pay for
    the layers before it once instead of once per replacement. Valid for sequential decoder loops (every causal
    family here); `resid_pre` must be the site layer's input for exactly the batch being run.
    """
    if layer == 0:
        yield
        return
    layers = arch.layers
    saved = [layers[i] for i in range(layer)]
    try:
        for i in range(layer - 1):
            layers[i] = _Passthrough()
        layers[layer - 1] = _Passthrough(resid_pre)
        yield
    finally:
        for i, module in enumerate(saved):
            layers[i] = module
