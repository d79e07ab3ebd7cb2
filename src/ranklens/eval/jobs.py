"""`ranklens eval sae` and `ranklens eval lorsa`: evaluate a trained dictionary on held-out text.

A ranklens run directory is evaluated on its own held-out documents (those after its training data, recorded at
training) unless ``--corpus`` asks for other text; an SAELens or LlamaScope directory (with ``--model`` and
``--site``) or a bare Lorsa directory is evaluated on ``--corpus`` in ``--seed`` order. The results are printed as a
table and written as JSON to DIR/eval.json (or ``--results FILE``, e.g. for a read-only directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranklens.config import DEFAULT_CONTEXT_LENGTH
from ranklens.data.sources import held_out_text, recorded_held_out
from ranklens.dictionaries.load import load_sae
from ranklens.dictionaries.lorsa_io import open_lorsa
from ranklens.errors import RanklensError
from ranklens.eval.config import LorsaEvalConfig, SAEEvalConfig
from ranklens.eval.held_out import HeldOutSet
from ranklens.eval.lorsa import evaluate_lorsa
from ranklens.io import atomic_write_json, read_json
from ranklens.lm.load import load_model
from ranklens.rundir import read_run_config

EVAL_NAME = "eval.json"
RUN_SAE_DIR = "sae"  # where `ranklens train sae` saves its SAE inside a run directory


def eval_sae(directory: str | Path, cfg: SAEEvalConfig, progress: bool = False) -> dict[str, Any]:
    """Evaluate a ranklens SAE run directory, or any SAELens / LlamaScope SAE directory, on held-out text."""
    directory = Path(directory)
    run = read_run_config(directory, "train-sae") if (directory / RUN_SAE_DIR).is_dir() else None
    sae_dir = directory / RUN_SAE_DIR if run is not None else directory
    if not sae_dir.is_dir():
        raise RanklensError(f"{str(directory)!r} is not an SAE directory or a ranklens train-sae run")
    sae = load_sae(sae_dir, device=cfg.device)
    model = cfg.model or (run or {}).get("model")
    site = cfg.site or (run or {}).get("site")
    if model is None or site is None:
        raise RanklensError("--model and --site are needed to evaluate an SAE that is not a ranklens run")
    lm = load_model(model, cfg.dtype, cfg.device)
    saved = None
    if run is not None and cfg.corpus is None:
        meta = read_json(sae_dir / "ranklens.json") if (sae_dir / "ranklens.json").exists() else {}
        saved = meta.get("extra", {}).get("held_out") or recorded_held_out(run, directory, lm).to_json()
    source = held_out_text(saved, corpus=cfg.corpus, seed=cfg.seed, context_length=cfg.context_length,
                           default_corpus=(run or {}).get("corpus", "default"),
                           default_context=(run or {}).get("context_length", DEFAULT_CONTEXT_LENGTH))
    site_name = lm.arch.site(site).name
    held_out = HeldOutSet(lm, [site_name], source, cfg.eval_tokens, cfg.lm_eval_tokens, progress=progress)
    result = held_out.evaluate(sae, site_name)
    result = {"held_out": source.to_json(), "config": cfg.model_dump(mode="json"), **result}
    atomic_write_json(cfg.results or directory / EVAL_NAME, result)
    return result


def eval_lorsa(directory: str | Path, cfg: LorsaEvalConfig, progress: bool = False) -> dict[str, Any]:
    """Evaluate a `train lorsa` run directory (on its held-out documents) or a saved Lorsa directory."""
    lorsa, meta, run_dir = open_lorsa(directory, cfg.device)
    lm = load_model(cfg.model or meta["model"], cfg.dtype, cfg.device)
    source = lorsa_text(meta, run_dir, lm, corpus=cfg.corpus, seed=cfg.seed, context_length=cfg.context_length)
    result = evaluate_lorsa(lorsa, lm, int(meta["layer"]), source, cfg.eval_tokens, cfg.lm_eval_tokens, progress)
    result = {"held_out": source.to_json(), "config": cfg.model_dump(mode="json"), **result}
    atomic_write_json(cfg.results or Path(directory) / EVAL_NAME, result)
    return result


def lorsa_text(meta: dict[str, Any], run_dir: Path | None, lm, *, corpus: str | None, seed: int,
               context_length: int | None):
    """The text to evaluate or interpret a saved Lorsa on (``ranklens.data.sources.held_out_text``)."""
    saved = meta.get("held_out")
    if saved is None and run_dir is not None and corpus is None:  # saved before the held-out record existed
        saved = recorded_held_out(meta["ranklens_config"], run_dir, lm, lorsa_layer=int(meta["layer"])).to_json()
    return held_out_text(saved, corpus=corpus, seed=seed, context_length=context_length,
                         default_corpus=meta.get("corpus", "default"),
                         default_context=int(meta.get("context_length", DEFAULT_CONTEXT_LENGTH)))
