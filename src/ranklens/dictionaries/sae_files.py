"""What the SAE file layouts share (``ranklens.dictionaries.saelens``, ``ranklens.dictionaries.llamascope``): reading
JSON and safetensors with one-line errors that name the file, checking tensor shapes, and building the SAE from
loaded tensors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from torch import nn

from ranklens.dictionaries.sae import SAEConfig, SparseAutoencoder
from ranklens.errors import RanklensError


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RanklensError(f"{what}: {str(path)!r} is not valid JSON ({err.msg} at line {err.lineno})") from err
    except OSError as err:
        raise RanklensError(f"{what}: cannot read {str(path)!r} ({err.strerror})") from err
    if not isinstance(obj, dict):
        raise RanklensError(f"{what}: {str(path)!r} holds a JSON {type(obj).__name__}; expected an object")
    return obj


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return st_load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise RanklensError(f"{what}: {str(path)!r} is not a readable safetensors file ({err})") from err


def sae_directory(directory: str | Path, what: str) -> Path:
    if not isinstance(directory, str | os.PathLike):
        raise RanklensError(f"{what}: directory is a {type(directory).__name__}; expected a path")
    d = Path(directory)
    if not d.exists():
        raise RanklensError(f"{what}: {str(d)!r} does not exist; expected an SAE directory")
    if not d.is_dir():
        raise RanklensError(f"{what}: {str(d)!r} is a file; expected an SAE directory")
    return d


def require_file(d: Path, name: str, what: str, layout: str) -> Path:
    path = d / name
    if not path.is_file():
        raise RanklensError(f"{what}: {str(d)!r} has no {name}; expected the {layout} layout")
    return path


def positive_int(value: Any, name: str, what: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RanklensError(f"{what}: {name}={value!r}; expected a positive integer")
    return value


def json_flag(cfg: dict[str, Any], key: str, default: bool | None, what: str) -> bool:
    if key not in cfg:
        if default is None:
            raise RanklensError(f"{what}: no {key!r}; expected true or false (its default differs between versions)")
        return default
    value = cfg[key]
    if not isinstance(value, bool):
        raise RanklensError(f"{what}: {key}={value!r}; expected true or false")
    return value


def check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str, where: Path):
    names = set(tensors)
    missing = sorted(set(expected) - names)
    if missing:
        raise RanklensError(
            f"{what}: {str(where)!r} lacks tensor(s) {', '.join(missing)}; expected {', '.join(sorted(expected))}"
        )
    extra = sorted(names - set(expected))
    if extra:
        raise RanklensError(
            f"{what}: {str(where)!r} has unexpected tensor(s) {', '.join(extra)}; expected only "
            f"{', '.join(sorted(expected))}"
        )
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise RanklensError(
                f"{what}: tensor {name} in {str(where)!r} has shape {list(got)}; expected {list(shape)}"
            )
        if not tensors[name].is_floating_point():
            raise RanklensError(f"{what}: tensor {name} has dtype {tensors[name].dtype}; expected floating point")


def build_sae(
    config: SAEConfig,
    W_E: torch.Tensor,
    b_E: torch.Tensor,
    W_D: torch.Tensor,
    b_D: torch.Tensor,
    log_threshold: torch.Tensor | None,
    device: torch.device | str,
) -> SparseAutoencoder:
    """A SparseAutoencoder with exactly these parameters (each cast to the config's dtype).

    Built on the meta device and then given the loaded tensors as its parameters, so a large dictionary never holds
    a second, randomly initialized copy of its weights."""
    sae = SparseAutoencoder(config, device="meta")
    dt = config.torch_dtype
    values = {"W_E": W_E, "b_E": b_E, "W_D": W_D, "b_D": b_D}
    if config.activation == "jumprelu":
        assert log_threshold is not None
        values["log_threshold"] = log_threshold
    for name, value in values.items():
        setattr(sae, name, nn.Parameter(value.to(device=device, dtype=dt).contiguous()))
    return sae


def log_threshold_of(theta: torch.Tensor) -> torch.Tensor:
    """log(theta) in float64; theta <= 0 -> -inf (z H(z - 0) = relu(z) is SAELens' relu(pre) (pre > theta))."""
    theta = theta.to(torch.float64)
    return torch.where(theta > 0, theta.clamp_min(1e-300).log(), torch.full_like(theta, -math.inf))
