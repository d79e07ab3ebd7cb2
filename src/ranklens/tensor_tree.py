"""Nested state (dicts, lists, tuples of tensors and plain numbers) in one safetensors file, with no pickle.

A training checkpoint (the dictionary's weights, the optimizer's moments and hyperparameters, the firing counters,
the step) is such a tree. ``torch.save`` would pickle it, and loading a pickle someone else wrote runs their code;
here every tensor is a named safetensors entry and the rest of the tree is JSON in the file's metadata, so loading
reads numbers and nothing else. Dict keys keep their type (ints stay ints: optimizer states are keyed by parameter
index), tuples stay tuples, floats round-trip exactly (JSON writes their shortest exact repr).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes

from ranklens.io import atomic_write_bytes

FORMAT = "ranklens.tensor_tree/1"


class TreeFileError(Exception):
    """A tree file that cannot be read (truncated, corrupted, or not one of ours)."""


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().contiguous().cpu()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode(v, tensors) for v in value]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}  # JSON has no inf/nan
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a tensor tree")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        ((kind, body),) = node.items()
        if kind == "tensor":
            return tensors[body]
        if kind == "dict":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
        if kind == "tuple":
            return tuple(_decode(v, tensors) for v in body)
        if kind == "list":
            return [_decode(v, tensors) for v in body]
        if kind == "float":
            return float(body)
        raise TreeFileError(f"unknown node kind {kind!r}")
    return node


def tree_bytes(tree: Any) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors)
    return save_bytes(tensors, metadata={"format": FORMAT, "tree": json.dumps(structure)})


def save_tree(path: str | Path, tree: Any) -> Path:
    """Write ``tree`` to ``path`` atomically."""
    return atomic_write_bytes(path, tree_bytes(tree))


def load_tree(path: str | Path, device: str = "cpu") -> Any:
    """The tree in ``path``; ``TreeFileError`` when the file is not a complete tree file."""
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise TreeFileError(f"format {meta.get('format')!r}; expected {FORMAT!r}")
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        return _decode(json.loads(meta["tree"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise TreeFileError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
