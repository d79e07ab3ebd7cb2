"""Replace a site's activation inside the running model (for spliced LM-loss evaluations).

`replace_site(arch, site, fn, positions)` registers, for the duration of a `with` block, a hook at the site's
hook point that swaps the activation x [batch, seq, d] for `fn(x[positions])` at the selected positions and
leaves the others (bos, eos, padding) untouched: a dictionary never sees those positions in training, so it is
not asked to reconstruct them. `fn` maps [n, d] -> [n, d] and runs on the selected rows only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ranklens.lm.sites import Architecture, Site

RowMap = Callable[[torch.Tensor], torch.Tensor]


def _spliced(x: torch.Tensor, fn: RowMap, positions: torch.Tensor) -> torch.Tensor:
    rows = fn(x[positions])
    out = x.clone()
    out[positions] = rows.to(x.dtype)
    return out


@contextmanager
def replace_site(arch: Architecture, site: Site, fn: RowMap, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, every forward of `arch`'s model sees `fn` applied at `site` on `positions` [B, T] bool."""
    module, point = arch.hook_point(site)

    def output_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (_spliced(output[0], fn, positions), *output[1:])
        return _spliced(output, fn, positions)

    def input_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (_spliced(args[0], fn, positions), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _spliced(kwargs["hidden_states"], fn, positions)}

    if point == "input":
        handle = module.register_forward_pre_hook(input_hook, with_kwargs=True)
    else:
        handle = module.register_forward_hook(output_hook)
    try:
        yield
    finally:
        handle.remove()


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
