"""The Python API for notebooks: ``import ranklens`` and call these on tensors, without run directories.

    import ranklens
    acts = ranklens.capture("smollm2-135m", ["The cat sat on the mat."] * 8, "L15.attn_out")["L15.attn_out"]
    ranklens.effective_rank(acts)                       # Definition 4.1 of the paper
    record = ranklens.spectrum(acts)                    # what `ranklens spectrum` writes per site
    sae, metrics = ranklens.train_sae(acts, k=32, expansion=4, init="asi", epochs=3)
    lorsa, metrics = ranklens.train_lorsa("smollm2-135m", layer=15, tokens=200_000, heads=1152)
    sae = ranklens.SparseAutoencoder.load("runs/sae")  # a ranklens run's sae/, SAELens or LlamaScope directory

Training here keeps everything in memory: no checkpoint, no log file (the rows are in ``metrics["history"]``),
unless ``run_dir`` is given; a run directory that already holds a checkpoint is only resumed with ``resume=True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ranklens.data.sequences import StreamSequences
from ranklens.data.tokenize import token_batches
from ranklens.dictionaries.lorsa import Lorsa
from ranklens.dictionaries.sae import SparseAutoencoder
from ranklens.errors import RanklensError
from ranklens.eval.metrics import ReconstructionMetrics
from ranklens.linalg.accumulator import accumulate
from ranklens.linalg.basis import effective_rank as _effective_rank
from ranklens.linalg.basis import singular_values
from ranklens.lm.attention import mhsa_weights
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel, load_model, resolve_dtype
from ranklens.spectrum.stats import spectrum_of
from ranklens.train.config import LorsaTrainConfig, SAETrainConfig
from ranklens.train.dead import dead_window
from ranklens.train.lorsa_job import build_lorsa, lorsa_config, resolve_layer
from ranklens.train.lorsa_objective import LorsaObjective
from ranklens.train.sae_job import build_sae, train_settings
from ranklens.train.sae_objective import SAEObjective
from ranklens.train.trainer import CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME, Trainer, TrainSettings

spectrum = spectrum_of

__all__ = ["capture", "effective_rank", "load_sae", "spectrum", "train_lorsa", "train_sae"]


def effective_rank(x: torch.Tensor | Iterable[torch.Tensor]) -> float:
    """The effective rank (Roy & Vetterli; the paper's Definition 4.1) of the mean-centered activations x [n, d], or
    of a stream of [m, d] chunks (accumulated in float64, never stacked)."""
    return _effective_rank(singular_values(accumulate(x)))


def _model(model: str | LoadedModel, dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, dtype, device)


@torch.no_grad()
def capture(model: str | LoadedModel, text_or_tokens: str | list[str] | torch.Tensor, sites: str | list[str], *,
            context_length: int = 1024, dtype: str = "auto") -> dict[str, torch.Tensor]:
    """The activations of ``sites`` on a text, a list of texts (each framed like training data: bos first,
    truncated to ``context_length``; rows of ordinary tokens only, [n_tokens, d]) or a batch of token ids
    ([batch, positions], every position: [batch, positions, d])."""
    lm = _model(model, dtype)
    capturer = Capturer(lm.arch, sites)
    if isinstance(text_or_tokens, torch.Tensor):
        return capturer(text_or_tokens.to(lm.device))
    texts = [text_or_tokens] if isinstance(text_or_tokens, str) else list(text_or_tokens)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in capturer.names}
    for batch in token_batches(iter(texts), lm.tokenizer, context_length, 8192):
        acts = capturer(batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device))
        for name in capturer.names:
            rows[name].append(acts[name][batch.stat_mask.to(lm.device)])
    return {name: torch.cat(r) for name, r in rows.items()}


def load_sae(directory: str | Path, device: str = "cpu") -> SparseAutoencoder:
    """An SAE from a `train sae` run directory (its sae/), a SAELens directory or a LlamaScope directory."""
    from ranklens.dictionaries.load import load_sae as load

    directory = Path(directory)
    return load(directory / "sae" if (directory / "sae").is_dir() else directory, device)


def _check_fresh(run_dir: str | Path | None, resume: bool) -> Path | None:
    if run_dir is None:
        return None
    run_dir = Path(run_dir)
    if not resume and any((run_dir / name).exists() for name in (CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME)):
        raise RanklensError(f"{str(run_dir)!r} holds a checkpoint; pass resume=True to continue it, or another "
                            "run_dir")
    return run_dir


class _Tensors:
    """Shuffled batches of rows [n, d] for ``steps`` steps, a new permutation each epoch (seeded), and the start of
    the rows for initializations."""

    def __init__(self, x: torch.Tensor, batch_size: int, steps: int, seed: int) -> None:
        self.x, self.batch_size, self.total_steps, self.seed = x, batch_size, steps, seed
        self.per_epoch = x.shape[0] // batch_size

    def head(self) -> Iterator[torch.Tensor]:
        yield self.x

    def __call__(self, start: int) -> Iterator[torch.Tensor]:
        epoch, offset = divmod(start, self.per_epoch)
        while True:
            order = torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch))
            for b in range(offset, self.per_epoch):
                yield self.x[order[b * self.batch_size:(b + 1) * self.batch_size]]
            epoch, offset = epoch + 1, 0


def train_sae(activations: torch.Tensor, *, eval_activations: torch.Tensor | None = None, epochs: int = 1,
              run_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
              **settings: Any) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train an SAE on activations [n, d] in memory; returns (sae, metrics).

    ``settings`` are the options of `ranklens train sae` (k, expansion, n_features, activation, init, d_init,
    b_dec_init, lr, batch_size, optimizer, aux_k, warmup_steps, train_dtype, seed, ...), checked the same way; the
    training reads the rows for ``epochs`` passes (a new shuffle each). Metrics: the training curve
    (``history``), the dead features over the last quarter of training (``train_dead``), and with
    ``eval_activations`` the FVU, L0 and dead features on them."""
    x = activations.detach().reshape(-1, activations.shape[-1])
    cfg = SAETrainConfig.build({"batch_size": min(4096, x.shape[0]), "warmup_steps": 0, **settings,
                                "tokens": x.shape[0] * epochs}, source="train_sae arguments")
    if x.shape[0] < cfg.batch_size:
        raise RanklensError(f"{x.shape[0]} rows hold no batch of {cfg.batch_size}; pass batch_size=")
    steps = (x.shape[0] // cfg.batch_size) * epochs
    source = _Tensors(x, cfg.batch_size, steps, cfg.seed if cfg.data_seed is None else cfg.data_seed)
    sae, info = build_sae(cfg, x.shape[1], source)
    window = cfg.dead_window_tokens or dead_window(steps * cfg.batch_size)
    objective = SAEObjective(sae, aux_k=cfg.aux_k, aux_coefficient=cfg.aux_coefficient,
                             autocast_dtype=resolve_dtype(cfg.train_dtype))
    trainer = Trainer(objective, train_settings(cfg, steps, window, "the SAE"), _check_fresh(run_dir, resume),
                      progress=progress)
    trainer.train(source)
    sae.eval()
    metrics: dict[str, Any] = {**info, "n_features": sae.n_features, "tokens": steps * cfg.batch_size,
                               "train_dead": trainer.tracker.n_dead(window), "dead_window_tokens": window,
                               "history": trainer.history["metrics.jsonl"]}
    if eval_activations is not None:
        metrics.update(reconstruction(sae, eval_activations))
    return sae, metrics


@torch.no_grad()
def reconstruction(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, Any]:
    """FVU, L0 and dead features of an SAE on activations x [n, d] (the keys of ``ranklens.eval.metrics``)."""
    m = ReconstructionMetrics(sae.n_features)
    rows = x.reshape(-1, x.shape[-1]).to(sae.W_D.dtype)
    x_hat, code = sae(rows)
    fired = code.indices[code.active_mask()] if code.is_sparse else code.active_mask().nonzero()[:, 1]
    m.update(rows, x_hat, fired)
    return m.result()


def train_lorsa(model: str | LoadedModel = "smollm2-135m", *, layer: int | str | None = None,
                corpus: str = "default", run_dir: str | Path | None = None, resume: bool = False,
                progress: bool = False, **settings: Any) -> tuple[Lorsa, dict[str, Any]]:
    """Train a Lorsa replacing one attention layer of ``model`` on ``corpus``, captured on the fly, in memory;
    returns (lorsa, metrics). ``settings`` are the options of `ranklens train lorsa` (heads, qk_groups, k, init,
    tokens, batch_tokens, lr, output_bias, ...). Metrics: the training curve (``history``), the FVU of the last
    logged steps, and the dead heads over the last quarter of training."""
    lm = _model(model, settings.get("dtype", "auto"))
    cfg = LorsaTrainConfig.build({"warmup_steps": 0, **settings, "model": lm.name, "corpus": corpus,
                                  "layer": layer, "source": "stream"}, source="train_lorsa arguments")
    layer = resolve_layer(cfg, lm.arch.n_layers)
    w = mhsa_weights(lm.arch, layer)
    lorsa_config(cfg, w)  # bad sizes fail before the data is read
    source = StreamSequences(lm, layer, corpus, seed=cfg.seed, context_length=cfg.context_length,
                             batch_tokens=cfg.batch_tokens, tokens=cfg.tokens)
    lorsa, info = build_lorsa(cfg, w, source)
    window = cfg.dead_window_tokens or dead_window(cfg.tokens)
    settings_ = TrainSettings(total_steps=source.total_steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, k=cfg.k,
                              dead_window_tokens=window, checkpoint_every=cfg.checkpoint_every,
                              log_every=cfg.log_every, what=f"the Lorsa of layer {layer}")
    objective = LorsaObjective(lorsa, aux_k=cfg.aux_k, aux_coefficient=cfg.aux_coefficient,
                               autocast_dtype=resolve_dtype(cfg.train_dtype))
    trainer = Trainer(objective, settings_, _check_fresh(run_dir, resume), progress=progress)
    trainer.train(source)
    lorsa.normalize_output_()
    history = trainer.history["metrics.jsonl"]
    return lorsa, {**info, "layer": layer, "n_heads": lorsa.n_heads, "steps": source.total_steps,
                   "train_dead": trainer.tracker.n_dead(window), "dead_window_tokens": window,
                   "fvu": history[-1]["fvu"] if history else None, "history": history,
                   "held_out": source.held_out.to_json()}
