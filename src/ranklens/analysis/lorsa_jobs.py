"""`ranklens zpattern` and `ranklens lorsa-top`: the interpretation jobs of a trained Lorsa (a `train lorsa` run
directory or a saved Lorsa directory), writing JSON (see ``ranklens.analysis.lorsa_interp``)."""

from __future__ import annotations

from pathlib import Path

from ranklens.analysis.config import LorsaTopConfig, ZPatternConfig
from ranklens.analysis.lorsa_interp import interpret, z_pattern_record
from ranklens.dictionaries.lorsa_io import open_lorsa
from ranklens.eval.jobs import lorsa_text
from ranklens.io import atomic_write_json
from ranklens.lm.load import load_model

TOP_NAME = "top_activations.json"
ATTRIBUTION_NAME = "attribution.json"


def run_zpattern(directory: str | Path, cfg: ZPatternConfig) -> dict:
    lorsa, meta, _ = open_lorsa(directory, cfg.device)
    lm = load_model(cfg.model or meta["model"], cfg.dtype, cfg.device)
    record = z_pattern_record(lorsa, lm, int(meta["layer"]), cfg.text, cfg.head, cfg.context_length)
    if cfg.output:
        atomic_write_json(cfg.output, record)
    return record


def run_lorsa_top(directory: str | Path, cfg: LorsaTopConfig, progress: bool = False) -> Path:
    """Writes top_activations.json (and attribution.json) to the output directory and returns it."""
    lorsa, meta, run_dir = open_lorsa(directory, cfg.device)
    lm = load_model(cfg.model or meta["model"], cfg.dtype, cfg.device)
    source = lorsa_text(meta, run_dir, lm, corpus=cfg.corpus, seed=cfg.seed, context_length=cfg.context_length)
    result = interpret(lorsa, lm, int(meta["layer"]), source, cfg.tokens, cfg.n_top, (cfg.before, cfg.after),
                       cfg.attribution, progress=progress)
    out = Path(cfg.output) if cfg.output else Path(directory) / "interp"
    atomic_write_json(out / TOP_NAME, result["top_activations"])
    if result["attribution"] is not None:
        atomic_write_json(out / ATTRIBUTION_NAME, result["attribution"])
    return out
