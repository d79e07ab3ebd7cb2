"""Load an SAE directory in whichever layout it is: SAELens or LlamaScope."""

from __future__ import annotations

from pathlib import Path

import torch

from ranklens.dictionaries.llamascope import LLAMASCOPE_HYPERPARAMS, load_llamascope
from ranklens.dictionaries.sae import SparseAutoencoder
from ranklens.dictionaries.sae_files import sae_directory
from ranklens.dictionaries.saelens import SAELENS_CFG, SAELENS_WEIGHTS, load_saelens
from ranklens.errors import RanklensError

__all__ = ["load_sae"]

def load_sae(directory: str | Path, device: torch.device | str = "cpu") -> SparseAutoencoder:
    """Load an SAE directory in whichever layout it is: SAELens (``cfg.json`` + ``sae_weights.safetensors``) or
    LlamaScope (``hyperparams.json``)."""
    what = "load_sae"
    d = sae_directory(directory, what)
    if (d / SAELENS_CFG).is_file() and (d / SAELENS_WEIGHTS).is_file():
        return load_saelens(d, device)
    if (d / LLAMASCOPE_HYPERPARAMS).is_file():
        return load_llamascope(d, device)
    names = sorted(p.name for p in d.iterdir())
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
    raise RanklensError(
        f"{what}: {str(d)!r} holds {shown}; expected cfg.json + sae_weights.safetensors (SAELens) or "
        "hyperparams.json + checkpoints/final.safetensors (LlamaScope)"
    )
