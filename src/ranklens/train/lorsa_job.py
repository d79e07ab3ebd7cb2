"""`ranklens train lorsa`: a Lorsa layer replacing one attention layer, trained and evaluated.

The job reads top to bottom, every step resumable in the run directory: resolve the config against the model; open
the model and the training data once (``ranklens.data.sources``: `L{layer}.attn_in` and `L{layer}.attn_out` of whole
sequences, from an existing store, one collected into DIR/activations, or captured on the fly); build the Lorsa (the
random init of App. O.2, `default`; plus the MHSA's Q/K, Lorsa paper App. B.3, `mhsa-qk`; or ASI for Lorsa,
dimensional-collapse paper Section 5.4 and App. K, `asi`: per-head value subspaces from a covariance of
`init_tokens` attention inputs, and the MHSA's Q/K); train it with the shared Trainer and `LorsaObjective` (Adam or
SparseAdam, AuxK, the App. O.1 schedule); rescale it to unit w_o rows (footnote 3, predictions unchanged); evaluate it
on the documents after the training data (``ranklens.eval.lorsa``: FVU, L0, dead heads, the spliced LM loss with
Lorsa's output in place of `attn_out`); and write DIR/lorsa (`lorsa.safetensors` + `cfg.json`, which reloads it
exactly) and DIR/metrics.json.

Defaults follow App. O.1 of the dimensional-collapse paper scaled to the target: H = 8 d_model heads, G = 8 n_heads QK
groups, d_qk = d_head, Adam (0.9, 0.999, 1e-8), lr 2e-4, batches of 32,768 tokens, 500 warm-up steps, AuxK alpha
1/32 with k_aux 512 when enabled. K is not given in O.1; the default 32 is about d_model / 16 for SmolLM2 (Lorsa paper
Table 1 uses 64 for d_model 768 and 128 for 4,096).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ranklens.data.collect import check_context_length
from ranklens.data.sequences import LorsaBatch, StoreSequences, StreamSequences
from ranklens.data.sources import lorsa_source
from ranklens.dictionaries.lorsa import Lorsa, LorsaConfig
from ranklens.dictionaries.lorsa_init import init_asi_, init_default_, init_qk_from_mhsa_
from ranklens.dictionaries.lorsa_io import RUN_LORSA_DIR as LORSA_DIR
from ranklens.dictionaries.lorsa_io import save_lorsa
from ranklens.distributed import Layout, rank_device, ranked_run_dir
from ranklens.errors import RanklensError
from ranklens.eval.lorsa import evaluate_lorsa
from ranklens.eval.metrics import METRICS_FORMAT, upgrade_metrics
from ranklens.io import atomic_write_json, read_json
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.lm.attention import MHSAWeights, mhsa_weights
from ranklens.lm.load import LoadedModel, load_model, resolve_dtype
from ranklens.rundir import check_output_dir, prepare_run_dir
from ranklens.train.config import LorsaTrainConfig
from ranklens.train.dead import dead_window
from ranklens.train.lorsa_objective import LorsaObjective
from ranklens.train.schedules import capped_warmup
from ranklens.train.trainer import Trainer, TrainSettings

METRICS_NAME = "metrics.json"


def resolve_layer(cfg: LorsaTrainConfig, n_layers: int) -> int:
    """The layer to replace: `--layer` (an integer, or mid), or the middle layer n_layers // 2."""
    layer = n_layers // 2 if cfg.layer in (None, "mid") else cfg.layer
    if not 0 <= layer < n_layers:
        raise RanklensError(f"--layer {layer} is out of range: the model has {n_layers} layers (valid 0..{n_layers - 1})")
    return layer


def lorsa_config(cfg: LorsaTrainConfig, w: MHSAWeights) -> LorsaConfig:
    """The LorsaConfig of a run: the MHSA's attention scheme (positions, causality, scale, ...) with the run's sizes."""
    heads = cfg.heads or 8 * w.d_model
    groups = cfg.qk_groups or 8 * w.n_heads
    if cfg.init != "default" and (cfg.d_qk or w.d_head) != w.d_head:
        raise RanklensError(f"--d-qk {cfg.d_qk} differs from the MHSA's d_head {w.d_head}; --init {cfg.init} copies "
                            "the MHSA's Q/K and needs them equal")
    if cfg.init == "asi" and heads < w.n_heads:
        raise RanklensError(f"--heads {heads} is fewer than the MHSA's {w.n_heads} heads; ASI needs at least one "
                            "Lorsa head per MHSA head")
    return LorsaConfig.from_mhsa(w, n_heads=heads, n_qk_groups=groups, k=cfg.k, d_qk=cfg.d_qk, dtype=torch.float32,
                                 group_chunk=cfg.group_chunk)


def _input_covariance(cfg: LorsaTrainConfig, batches, d: int) -> CovarianceAccumulator:
    """Covariance of the first `init_tokens` ordinary attention inputs of the training data."""
    acc = CovarianceAccumulator(d)
    for batch in batches:
        rows = batch.x[batch.stat_mask]
        acc.update(rows[: cfg.init_tokens - acc.n])
        if acc.n >= cfg.init_tokens:
            break
    return acc


def _target_mean(cfg: LorsaTrainConfig, batches, d: int) -> torch.Tensor:
    """Mean attention output (float64) over the first `init_tokens` ordinary training tokens."""
    total, n = torch.zeros(d, dtype=torch.float64), 0
    for batch in batches:
        rows = batch.target[batch.stat_mask][: cfg.init_tokens - n]
        total += rows.double().sum(0).cpu()
        n += rows.shape[0]
        if n >= cfg.init_tokens:
            break
    if n == 0:
        raise RanklensError("--output-bias mean: the training data holds no ordinary token")
    return total / n


def build_lorsa(cfg: LorsaTrainConfig, w: MHSAWeights, source: StoreSequences | StreamSequences,
                ) -> tuple[Lorsa, dict]:
    """The Lorsa with the configured initialization (``source.head()``: the training batches from the start, read by
    ASI and by `output_bias: mean` only) and a description of the init for the metrics."""
    lorsa = Lorsa(lorsa_config(cfg, w), device=cfg.device)
    init_default_(lorsa, torch.Generator().manual_seed(cfg.seed))
    w32 = w.to(dtype=torch.float32, device=cfg.device)
    info: dict = {"init": cfg.init, "d_init": None, "qk_trainable": cfg.qk_trainable}
    if cfg.init == "mhsa-qk":
        init_qk_from_mhsa_(lorsa, w32, trainable=cfg.qk_trainable)
    elif cfg.init == "asi":
        acc = _input_covariance(cfg, source.head(), w.d_model)
        d_init = cfg.d_init or lorsa.cfg.d_qk
        init_asi_(lorsa, w32, acc, d_init=d_init, qk_trainable=cfg.qk_trainable)
        info.update(d_init=d_init, init_tokens=acc.n)
    info["output_bias"] = cfg.output_bias
    if cfg.output_bias == "mean":
        if lorsa.b_O is None:
            raise RanklensError("--output-bias mean needs a Lorsa with an output bias")
        with torch.no_grad():
            lorsa.b_O.copy_(_target_mean(cfg, source.head(), w.d_model).to(lorsa.b_O))
    return lorsa, info


def train_lorsa(cfg: LorsaTrainConfig, out: str | Path, progress: bool = True, lm: LoadedModel | None = None,
                layout: Layout | None = None) -> dict:
    """Train (or resume, or reuse) the Lorsa of `cfg` in `out`; returns the metrics.json content. `lm` reuses a
    model the caller already loaded (it must be `cfg.model` in `cfg.dtype`). Under torchrun the ranks are
    data-parallel replicas, each training on its share of the sequences of every batch (rank 0 returns the
    metrics, the others {})."""
    layout = layout or Layout()
    if (Path(out) / METRICS_NAME).exists():
        prepare_run_dir(out, cfg, "train-lorsa")  # refuses a directory of another run
        return upgrade_metrics(read_json(Path(out) / METRICS_NAME)) if layout.main else {}
    check_output_dir(out)
    if layout.world > 1 and (cfg.source != "store" or cfg.store is None):
        raise RanklensError("training under torchrun reads an existing activation store (--store DIR; collect it "
                            "first, `torchrun ... ranklens collect` shares that work too)")
    lm = lm or load_model(cfg.model, cfg.dtype, rank_device(cfg.device))
    check_context_length(lm.model, cfg.context_length)
    layer = resolve_layer(cfg, lm.arch.n_layers)
    w = mhsa_weights(lm.arch, layer)
    lorsa_config(cfg, w)  # bad sizes fail before anything is written
    if cfg.tokens < cfg.batch_tokens:
        raise RanklensError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_tokens}")
    with ranked_run_dir(out, cfg, "train-lorsa", layout) as run_dir:
        return _train(cfg, run_dir, lm, layer, w, progress, layout)


def _shares(source, layout: Layout):
    """This replica's sequences of every batch (sequence r, r + replicas, ...); one replica: the batches."""
    if layout.data == 1:
        return source

    def batches(start: int):
        for b in source(start):
            rows = slice(layout.data_rank, None, layout.data)
            yield LorsaBatch(b.x[rows], b.target[rows], b.attention_mask[rows], b.stat_mask[rows])

    return batches


def lorsa_notes(result: dict, cfg: LorsaTrainConfig) -> list[str]:
    """What a person should know about a finished Lorsa run: tokens short of --tokens, and an FVU above 1 (worse than
    predicting the target's mean)."""
    notes = []
    if result["tokens"] < cfg.tokens:
        notes.append(f"note: trained on {result['tokens']:,} of the {cfg.tokens:,} tokens asked: {result['steps']} "
                     f"batches of whole sequences holding at least {cfg.batch_tokens:,} tokens each fit in --tokens")
    if result["fvu"] > 1:
        notes.append(f"warning: held-out FVU {result['fvu']:.3f} is above 1: the Lorsa predicts the attention output "
                     f"worse than its mean does. Short runs cannot move the output bias to the mean (norm ~20 on "
                     f"SmolLM2): train longer, or start it there (--output-bias mean)")
    return notes


def _train(cfg: LorsaTrainConfig, out: Path, lm: LoadedModel, layer: int, w: MHSAWeights, progress: bool,
           layout: Layout) -> dict:
    """Open the data, build, train, evaluate and write, in the locked run directory."""
    source = lorsa_source(lm, layer, kind=cfg.source, store=cfg.store, run_dir=out, corpus=cfg.corpus,
                          seed=cfg.seed, context_length=cfg.context_length, tokens=cfg.tokens,
                          batch_tokens=cfg.batch_tokens, dtype=cfg.dtype, device=cfg.device, progress=progress)

    lorsa, init_info = build_lorsa(cfg, w, source)

    window = cfg.dead_window_tokens or dead_window(cfg.tokens)
    warmup, warning = capped_warmup(cfg.warmup_steps, source.total_steps)
    if warning:
        print(f"ranklens: warning: {warning}", file=sys.stderr)
    settings = TrainSettings(total_steps=source.total_steps, lr=cfg.lr, optimizer=cfg.optimizer,
                             bias_correction=cfg.bias_correction, warmup_steps=warmup, k=cfg.k,
                             dead_window_tokens=window, checkpoint_every=cfg.checkpoint_every,
                             log_every=cfg.log_every, wandb_project=cfg.wandb_project,
                             what=f"the Lorsa of layer {layer}")
    objective = LorsaObjective(lorsa, aux_k=cfg.aux_k, aux_coefficient=cfg.aux_coefficient,
                               autocast_dtype=resolve_dtype(cfg.train_dtype), normalize_output=cfg.normalize_output)
    trainer = Trainer(objective, settings, out, progress=progress, layout=layout)
    trainer.train(_shares(source, layout))
    train_dead = int(trainer.tracker.n_dead(window))
    if not layout.main:
        return {}
    lorsa.normalize_output_()  # footnote 3: unit w_o, same predictions

    held_out = source.held_out
    result = {"metrics_format": METRICS_FORMAT, "n_heads": lorsa.n_heads, "n_qk_groups": lorsa.cfg.n_qk_groups,
              "d_qk": lorsa.cfg.d_qk, "k": cfg.k, "layer": layer, **init_info,
              "tokens": int(trainer.tracker.tokens_seen), "steps": source.total_steps, "optimizer": cfg.optimizer,
              "aux_k": cfg.aux_k, "train_dead": train_dead, "train_dead_fraction": train_dead / lorsa.n_heads,
              "dead_window_tokens": window, "source": cfg.source, "held_out": held_out.to_json()}
    result.update(evaluate_lorsa(lorsa, lm, layer, held_out, cfg.eval_tokens, cfg.lm_eval_tokens, progress))
    for message in lorsa_notes(result, cfg):
        print(f"ranklens: {message}", file=sys.stderr)

    save_lorsa(lorsa, out / LORSA_DIR, model=cfg.model, layer=layer, context_length=held_out.context_length,
               corpus=held_out.corpus, held_out=held_out.to_json(), ranklens_config=cfg.model_dump(mode="json"),
               **init_info)
    atomic_write_json(out / METRICS_NAME, result)
    return result
