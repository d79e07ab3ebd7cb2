"""`ranklens zpattern` and `ranklens lorsa-top`: the interpretation jobs of a trained Lorsa (a `train lorsa` run
directory or a saved Lorsa directory), writing JSON (see ``ranklens.analysis.lorsa_interp``)."""

from __future__ import annotations

from pathlib import Path

from ranklens.analysis.lorsa_interp import interpret, z_pattern_record
from ranklens.config import Config
from ranklens.errors import RanklensError
from ranklens.io import atomic_write_json
from ranklens.lm.load import load_model
from ranklens.train.lorsa_job import evaluation_text, open_lorsa

TOP_NAME = "top_activations.json"
ATTRIBUTION_NAME = "attribution.json"


class ZPatternConfig(Config):
    head: int | None = None  # required: the Lorsa head
    text: str | None = None  # required: the text
    model: str | None = None  # default: the model the Lorsa was trained for
    context_length: int = 1024
    output: str | None = None  # write the JSON here (default: print it)
    dtype: str = "auto"
    device: str = "cpu"


class LorsaTopConfig(Config):
    tokens: int = 100_000  # held-out ordinary tokens to scan
    n_top: int = 16  # activations kept per head (Lorsa paper Section 4.1)
    before: int = 12  # context tokens kept before the activating token
    after: int = 4  # and after it
    attribution: bool = True  # also attribute each head to the MHSA heads (App. F)
    model: str | None = None
    corpus: str | None = None  # default: the training run's held-out documents
    seed: int = 1  # document order of --corpus
    context_length: int | None = None
    output: str | None = None  # directory for the JSON files (default: DIR/interp)
    dtype: str = "auto"
    device: str = "cpu"


def run_zpattern(directory: str | Path, cfg: ZPatternConfig) -> dict:
    if cfg.head is None or cfg.text is None:
        raise RanklensError("zpattern needs --head H and --text TEXT")
    lorsa, meta, _ = open_lorsa(directory, cfg.device)
    lm = load_model(cfg.model or meta["model"], cfg.dtype, cfg.device)
    record = z_pattern_record(lorsa, lm, int(meta["layer"]), cfg.text, cfg.head, cfg.context_length)
    if cfg.output:
        atomic_write_json(cfg.output, record)
    return record


def run_lorsa_top(directory: str | Path, cfg: LorsaTopConfig) -> Path:
    """Writes top_activations.json (and attribution.json) to the output directory and returns it."""
    lorsa, meta, run = open_lorsa(directory, cfg.device)
    lm = load_model(cfg.model or meta["model"], cfg.dtype, cfg.device)
    source = evaluation_text(directory, meta, run, lm, cfg.corpus, cfg.seed, cfg.context_length)
    result = interpret(lorsa, lm, int(meta["layer"]), source, cfg.tokens, cfg.n_top, (cfg.before, cfg.after),
                       cfg.attribution)
    out = Path(cfg.output) if cfg.output else Path(directory) / "interp"
    atomic_write_json(out / TOP_NAME, result["top_activations"])
    if result["attribution"] is not None:
        atomic_write_json(out / ATTRIBUTION_NAME, result["attribution"])
    return out
