"""Save and load a Lorsa layer: ``lorsa.safetensors`` (the parameters) and ``cfg.json`` (the exact ``LorsaConfig``,
RoPE frequencies included, and what it replaces: model, layer, ...), so a reload computes exactly what was saved.

Tensors are stored in the layout of ``Lorsa`` (heads on dim 0): ``W_Q, W_K [G, d_qk, d]``, ``b_Q, b_K [G, d_qk]``,
``W_V, W_O [H, d]``, ``b_V [H]``, ``b_O [d]`` (and ``q_norm_weight, k_norm_weight [G, d_qk]`` with q/k norms).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ranklens.dictionaries.lorsa import Lorsa, LorsaConfig
from ranklens.errors import RanklensError
from ranklens.io import atomic_directory

__all__ = ["CONFIG_NAME", "RUN_LORSA_DIR", "WEIGHTS_NAME", "load_lorsa", "open_lorsa", "save_lorsa"]

WEIGHTS_NAME = "lorsa.safetensors"
CONFIG_NAME = "cfg.json"
FORMAT = "ranklens-lorsa"


def save_lorsa(lorsa: Lorsa, directory: str | Path, **meta: Any) -> Path:
    """Write the Lorsa to ``directory`` as one atomic directory (replacing an older one); ``meta`` (JSON-ready) goes
    into cfg.json beside the config."""
    directory = Path(directory)
    tensors = {name: t.detach().contiguous().cpu() for name, t in lorsa.state_dict().items()}
    record = {"format": FORMAT, "lorsa": lorsa.cfg.to_dict(), **meta}
    with atomic_directory(directory, replace=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(record, indent=1) + "\n")
    return directory


def load_lorsa(directory: str | Path, device: torch.device | str | None = None) -> tuple[Lorsa, dict[str, Any]]:
    """The Lorsa saved in ``directory`` and the metadata saved with it."""
    directory = Path(directory)
    cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise RanklensError(f"{str(directory)!r} holds no Lorsa; expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        record = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise RanklensError(f"{str(cfg_path)!r} is not valid JSON ({err.msg})") from err
    if record.get("format") != FORMAT:
        raise RanklensError(f"{str(cfg_path)!r} has format {record.get('format')!r}; expected {FORMAT!r}")
    lorsa = Lorsa(LorsaConfig.from_dict(record.pop("lorsa")), device=device)
    state = load_file(str(weights), device=str(device or "cpu"))
    try:
        lorsa.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RanklensError(f"{str(weights)!r} does not fit its cfg.json: {err}") from err
    record.pop("format")
    return lorsa, record


RUN_LORSA_DIR = "lorsa"  # where `ranklens train lorsa` saves its Lorsa inside a run directory


def open_lorsa(directory: str | Path, device: torch.device | str | None = None) -> tuple[Lorsa, dict[str, Any], Path | None]:
    """(Lorsa, its saved metadata, the run directory or None) of a `ranklens train lorsa` run directory or of a saved
    Lorsa directory."""
    directory = Path(directory)
    if (directory / RUN_LORSA_DIR).is_dir():
        lorsa, meta = load_lorsa(directory / RUN_LORSA_DIR, device=device)
        return lorsa, meta, directory
    if not directory.is_dir():
        raise RanklensError(f"{str(directory)!r} is not a directory; expected a `ranklens train lorsa` run or a Lorsa "
                            "directory")
    lorsa, meta = load_lorsa(directory, device=device)
    return lorsa, meta, None
