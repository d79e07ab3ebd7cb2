"""`ranklens train lorsa` and `ranklens eval lorsa`: a Lorsa layer replacing one attention layer, trained and evaluated.

Steps, each resumable in the run directory:
1. activations: `L{layer}.attn_in` and `L{layer}.attn_out` of whole sequences, from an existing store (`store`), one
   collected into DIR/activations, or captured on the fly (`source: stream`);
2. initialization: the random init of App. O.2 (`default`), plus the MHSA's Q/K (Lorsa paper App. B.3, `mhsa-qk`),
   or ASI for Lorsa (dimensional-collapse paper Section 5.4 and App. K, `asi`: per-head value subspaces from a
   covariance of `init_tokens` attention inputs, and the MHSA's Q/K);
3. training with the shared Trainer and `LorsaObjective` (Adam or SparseAdam, AuxK, the App. O.1 schedule: linear
   warm-up over `warmup_steps`, constant, linear decay to 1% over the last 20% of steps);
4. the Lorsa rescaled to unit w_o rows (footnote 3, predictions unchanged) and saved to DIR/lorsa
   (`lorsa.safetensors` + `cfg.json`, which reloads it exactly);
5. evaluation on held-out documents (those after the training data's): FVU, L0, dead heads over the evaluation
   tokens, and the spliced LM loss with Lorsa's output in place of `attn_out`; written to DIR/metrics.json.

Defaults follow App. O.1 of the dimensional-collapse paper scaled to the target: H = 8 d_model heads, G = 8 n_heads QK
groups, d_qk = d_head, Adam (0.9, 0.999, 1e-8), lr 2e-4, batches of 32,768 tokens, 500 warm-up steps, AuxK alpha
1/32 with k_aux 512 when enabled. K is not given in O.1; the default 32 is about d_model / 16 for SmolLM2 (Lorsa paper
Table 1 uses 64 for d_model 768 and 128 for 4,096).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import torch

from ranklens.config import Config
from ranklens.data.collect import CollectConfig, check_context_length, collect
from ranklens.data.store import ActivationStore
from ranklens.data.tokenize import DEFAULT_CONTEXT_LENGTH, first_tokens, token_batches
from ranklens.dictionaries.lorsa import Lorsa, LorsaConfig
from ranklens.dictionaries.lorsa_init import init_asi_, init_default_, init_qk_from_mhsa_
from ranklens.dictionaries.lorsa_io import load_lorsa, save_lorsa
from ranklens.errors import RanklensError
from ranklens.eval.held_out import EVAL_BATCH_TOKENS, HeldOutSource
from ranklens.eval.lm_loss import spliced_lm_loss
from ranklens.eval.metrics import ReconstructionMetrics
from ranklens.io import atomic_write_json, read_json
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.lm.attention import MHSAWeights, mhsa_weights
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel, load_model, resolve_dtype
from ranklens.lm.sites import Site, describe
from ranklens.lm.splice import SequenceSplice
from ranklens.rundir import prepare_run_dir
from ranklens.train.dead import dead_window
from ranklens.train.lorsa_data import StoreSequences, StreamSequences, lorsa_sites
from ranklens.train.lorsa_objective import LorsaObjective
from ranklens.train.trainer import Trainer, TrainSettings

METRICS_NAME = "metrics.json"
LORSA_DIR = "lorsa"


class LorsaTrainConfig(Config):
    model: str = "smollm2-135m"
    layer: int | None = None  # default: the middle layer, n_layers // 2
    heads: int | None = None  # H, Lorsa heads; default 8 x d_model (App. O.1)
    qk_groups: int | None = None  # G, QK groups (heads share Q/K within one); default 8 x the MHSA's heads
    d_qk: int | None = None  # default: the MHSA's d_head (App. O.1; Lorsa App. B: never below it)
    k: int = 32  # heads active per token (top-K)
    init: Literal["default", "mhsa-qk", "asi"] = "default"
    qk_trainable: bool = True  # copied Q/K keep training (App. B.3: better than fixed)
    d_init: int | None = None  # ASI subspace dimension per head; default d_qk (App. O.1: d_head)
    init_tokens: int = 100_000  # attention inputs behind ASI's per-head subspaces (and the mean of output_bias)
    # App. O.2 starts b_O at zero; "mean" starts it at the mean attention output of the first init_tokens training
    # tokens. Why offer it: b_O moves at most ~lr per Adam step, so a short run cannot learn a target mean of norm
    # ~20 (SmolLM2 layer 15) from zero and ends with FVU above 1 whatever its heads learn.
    output_bias: Literal["zero", "mean"] = "zero"
    corpus: str = "default"
    source: Literal["store", "stream"] = "store"  # store: from an activation store; stream: captured on the fly
    store: str | None = None  # a store holding L{layer}.attn_in and attn_out; default: collected into DIR/activations
    tokens: int = 1_000_000  # training tokens (ordinary tokens; whole batches)
    batch_tokens: int = 32_768  # ordinary tokens per batch of whole sequences (App. O.1)
    optimizer: Literal["adam", "sparseadam"] = "adam"
    bias_correction: Literal["per_row", "per_tensor"] = "per_row"
    lr: float = 2e-4  # App. O.1
    warmup_steps: int = 500
    aux_k: int = 0  # 512 for the AuxK baseline (App. O.1)
    aux_coefficient: float = 1 / 32
    normalize_output: bool = False  # renormalize w_o rows after every step (footnote 3's rescaling)
    dead_window_tokens: int | None = None  # default: dead_window(tokens)
    eval_tokens: int = 100_000
    lm_eval_tokens: int = 16_384
    seed: int = 0
    context_length: int = DEFAULT_CONTEXT_LENGTH
    dtype: str = "auto"  # the language model's dtype
    train_dtype: Literal["float32", "bfloat16"] = "float32"  # bf16 = autocast of Lorsa's matmuls and attention
    group_chunk: int | None = None  # QK groups per attention call (memory); default all at once
    device: str = "cpu"
    checkpoint_every: int = 100
    log_every: int = 10
    wandb_project: str | None = None


def resolve_layer(cfg: LorsaTrainConfig, n_layers: int) -> int:
    layer = n_layers // 2 if cfg.layer is None else cfg.layer
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


def build_lorsa(cfg: LorsaTrainConfig, w: MHSAWeights, batches) -> tuple[Lorsa, dict]:
    """The Lorsa with the configured initialization (`batches()`: a fresh iterator of training LorsaBatches, read by
    ASI and by `output_bias: mean` only) and a description of the init for the metrics."""
    lorsa = Lorsa(lorsa_config(cfg, w), device=cfg.device)
    init_default_(lorsa, torch.Generator().manual_seed(cfg.seed))
    w32 = w.to(dtype=torch.float32, device=cfg.device)
    info: dict = {"init": cfg.init, "d_init": None, "qk_trainable": cfg.qk_trainable}
    if cfg.init == "mhsa-qk":
        init_qk_from_mhsa_(lorsa, w32, trainable=cfg.qk_trainable)
    elif cfg.init == "asi":
        acc = _input_covariance(cfg, batches(), w.d_model)
        d_init = cfg.d_init or lorsa.cfg.d_qk
        init_asi_(lorsa, w32, acc, d_init=d_init, qk_trainable=cfg.qk_trainable)
        info.update(d_init=d_init, init_tokens=acc.n)
    info["output_bias"] = cfg.output_bias
    if cfg.output_bias == "mean":
        if lorsa.b_O is None:
            raise RanklensError("--output-bias mean needs a Lorsa with an output bias")
        with torch.no_grad():
            lorsa.b_O.copy_(_target_mean(cfg, batches(), w.d_model).to(lorsa.b_O))
    return lorsa, info


def _store(cfg: LorsaTrainConfig, layer: int, out: Path, lm: LoadedModel, progress: bool) -> ActivationStore:
    if cfg.store is not None:
        return ActivationStore(cfg.store, require_complete=True)
    collect_cfg = CollectConfig(model=cfg.model, sites=",".join(lorsa_sites(layer)), corpus=cfg.corpus,
                                tokens=cfg.tokens, context_length=cfg.context_length, seed=cfg.seed, dtype=cfg.dtype,
                                device=cfg.device)
    return collect(collect_cfg, out / "activations", progress=progress, lm=lm)


def _source(cfg: LorsaTrainConfig, layer: int, out: Path, lm: LoadedModel, progress: bool,
            ) -> tuple[StoreSequences | StreamSequences, HeldOutSource]:
    """The training batches and the text held out after them."""
    if cfg.source == "stream":
        source = StreamSequences(lm, layer, cfg.corpus, seed=cfg.seed, context_length=cfg.context_length,
                                 batch_tokens=cfg.batch_tokens, tokens=cfg.tokens)
        held_out = HeldOutSource(cfg.corpus, cfg.seed, source.docs_consumed, cfg.context_length)
    else:
        store = _store(cfg, layer, out, lm, progress)
        source = StoreSequences(store, layer, cfg.batch_tokens, cfg.seed, cfg.tokens)
        m = store.meta
        held_out = HeldOutSource(m["corpus"], int(m["seed"]), store.docs_consumed, int(m["context_length"]))
    if source.total_steps == 0:
        raise RanklensError(f"--tokens {cfg.tokens} holds no whole batch of {cfg.batch_tokens} tokens")
    return source, held_out


def train_lorsa(cfg: LorsaTrainConfig, out: str | Path, progress: bool = True, lm: LoadedModel | None = None,
                ) -> dict:
    """Train (or resume, or reuse) the Lorsa of `cfg` in `out`; returns the metrics.json content. `lm` reuses a
    model the caller already loaded (it must be `cfg.model` in `cfg.dtype`)."""
    metrics_path = Path(out) / METRICS_NAME
    if metrics_path.exists():
        prepare_run_dir(out, cfg, "train-lorsa")  # refuses a directory of another run
        return read_json(metrics_path)
    lm = lm or load_model(cfg.model, cfg.dtype, cfg.device)
    check_context_length(lm.model, cfg.context_length)
    arch = describe(lm.model)
    layer = resolve_layer(cfg, arch.n_layers)
    w = mhsa_weights(lm.model, layer)
    lorsa_config(cfg, w)  # bad sizes fail before anything is written
    if cfg.tokens < cfg.batch_tokens:
        raise RanklensError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_tokens}")
    out = prepare_run_dir(out, cfg, "train-lorsa")
    source, held_out = _source(cfg, layer, out, lm, progress)
    lorsa, init_info = build_lorsa(cfg, w, lambda: source(0))
    window = cfg.dead_window_tokens or dead_window(cfg.tokens)
    settings = TrainSettings(total_steps=source.total_steps, lr=cfg.lr, optimizer=cfg.optimizer,
                             bias_correction=cfg.bias_correction, warmup_steps=cfg.warmup_steps, k=cfg.k,
                             dead_window_tokens=window, checkpoint_every=cfg.checkpoint_every,
                             log_every=cfg.log_every, wandb_project=cfg.wandb_project)
    objective = LorsaObjective(lorsa, aux_k=cfg.aux_k, aux_coefficient=cfg.aux_coefficient,
                               autocast_dtype=resolve_dtype(cfg.train_dtype), normalize_output=cfg.normalize_output)
    trainer = Trainer(objective, settings, out, progress=progress)
    trainer.train(source)
    train_dead = int(trainer.tracker.n_dead(window))
    lorsa.normalize_output_()  # footnote 3: unit w_o, same predictions
    save_lorsa(lorsa, out / LORSA_DIR, model=cfg.model, layer=layer, context_length=held_out.context_length,
               corpus=held_out.corpus, ranklens_config=cfg.model_dump(mode="json"), **init_info)
    result = {"n_heads": lorsa.n_heads, "n_qk_groups": lorsa.cfg.n_qk_groups, "d_qk": lorsa.cfg.d_qk, "k": cfg.k,
              "layer": layer, **init_info, "tokens": int(trainer.tracker.tokens_seen), "steps": source.total_steps,
              "optimizer": cfg.optimizer, "aux_k": cfg.aux_k, "train_dead_heads": train_dead,
              "train_dead_fraction": train_dead / lorsa.n_heads, "dead_window_tokens": window, "source": cfg.source}
    result.update(evaluate_lorsa(lorsa, lm, layer, held_out, cfg.eval_tokens, cfg.lm_eval_tokens))
    atomic_write_json(metrics_path, result)
    return result


def _attention_mask(lorsa: Lorsa, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The mask Lorsa needs for right-padded batches: none for a causal Lorsa (no real query sees a padded key)."""
    return None if lorsa.cfg.causal else attention_mask


@torch.no_grad()
def evaluate_lorsa(lorsa: Lorsa, lm: LoadedModel, layer: int, source: HeldOutSource, eval_tokens: int,
                   lm_eval_tokens: int) -> dict:
    """FVU, L0 and dead heads over `eval_tokens` held-out tokens, and the spliced LM loss over `lm_eval_tokens`
    (definitions in DESIGN.md; `source` must be text Lorsa never trained on). A head is dead when it is never
    among the top K with a positive z over the evaluation tokens."""
    arch = describe(lm.model)
    if arch.d_model != lorsa.d_model:
        raise RanklensError(f"{lm.name} has d_model {arch.d_model} but the Lorsa expects {lorsa.d_model}")
    site_in, site_out = lorsa_sites(layer)
    metrics = ReconstructionMetrics(lorsa.n_heads)
    capture = Capturer(lm.model, [site_in, site_out])
    batches = first_tokens(token_batches(source.documents(), lm.tokenizer, source.context_length, EVAL_BATCH_TOKENS),
                           max(eval_tokens, lm_eval_tokens))
    dtype = lorsa.W_V.dtype
    for batch in batches:
        if metrics.n_tokens >= eval_tokens:
            break
        acts = capture(batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device))
        out = lorsa(acts[site_in].to(dtype), _attention_mask(lorsa, batch.attention_mask.to(lm.device)))
        sel = batch.stat_mask.to(lm.device)
        n = eval_tokens - metrics.n_tokens
        values, indices = out.values[sel][:n], out.indices[sel][:n]
        metrics.update(acts[site_out][sel][:n].to(dtype), out.out[sel][:n], indices[values > 0])
    r = metrics.result()
    result = {"fvu": r["nmse"], "nmse_uncentered": r["nmse_uncentered"], "explained_variance": r["explained_variance"],
              "l0": r["l0"], "eval_tokens": r["eval_tokens"], "dead_heads": r["eval_dead_features"],
              "dead_fraction": r["eval_dead_fraction"]}
    if arch.causal:
        lm_batches = first_tokens(iter(batches), lm_eval_tokens)

        def replacement(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return lorsa(x.to(dtype), _attention_mask(lorsa, attention_mask)).out

        splice = SequenceSplice(Site.parse(site_in), replacement)
        result.update(spliced_lm_loss(lm.model, arch, lm_batches, Site.parse(site_out), splice),
                      lm_eval_tokens=sum(b.n_tokens for b in lm_batches))
    else:
        print(f"note: {lm.name} is not a causal LM; skipping the spliced LM loss", file=sys.stderr)
    return result


class LorsaEvalConfig(Config):
    model: str | None = None  # default: the model the Lorsa was trained for
    corpus: str | None = None  # default: the training run's held-out documents
    seed: int = 1  # document order of --corpus
    eval_tokens: int = 100_000
    lm_eval_tokens: int = 16_384
    context_length: int | None = None
    dtype: str = "auto"
    device: str = "cpu"


def open_lorsa(directory: str | Path, device: str = "cpu") -> tuple[Lorsa, dict, LorsaTrainConfig | None]:
    """(Lorsa, its saved metadata, the training config) of a `train lorsa` run directory or a saved Lorsa directory
    (training config None)."""
    directory = Path(directory)
    if (directory / LORSA_DIR).is_dir():
        lorsa, meta = load_lorsa(directory / LORSA_DIR, device=device)
        return lorsa, meta, LorsaTrainConfig.build(meta["ranklens_config"], source=str(directory / LORSA_DIR))
    if not directory.is_dir():
        raise RanklensError(f"{str(directory)!r} is not a directory; expected a `ranklens train lorsa` run or a Lorsa "
                            "directory")
    lorsa, meta = load_lorsa(directory, device=device)
    return lorsa, meta, None


def evaluation_text(directory: str | Path, lorsa_meta: dict, run: LorsaTrainConfig | None, lm: LoadedModel,
                    corpus: str | None, seed: int, context_length: int | None) -> HeldOutSource:
    """The text to evaluate or interpret a Lorsa on: a run's held-out documents (those after its training data),
    or `corpus` in `seed` order."""
    if run is not None and corpus is None:
        if run.source == "stream":
            stream = StreamSequences(lm, int(lorsa_meta["layer"]), run.corpus, seed=run.seed,
                                     context_length=run.context_length, batch_tokens=run.batch_tokens,
                                     tokens=run.tokens)
            source = HeldOutSource(run.corpus, run.seed, stream.docs_consumed, run.context_length)
        else:
            store = ActivationStore(run.store or Path(directory) / "activations")
            m = store.meta
            source = HeldOutSource(m["corpus"], int(m["seed"]), store.docs_consumed, int(m["context_length"]))
    else:
        source = HeldOutSource(corpus or lorsa_meta.get("corpus", "default"), seed, 0,
                               int(lorsa_meta.get("context_length", DEFAULT_CONTEXT_LENGTH)))
    if context_length is not None:
        source = HeldOutSource(source.corpus, source.seed, source.start_doc, context_length)
    return source


def eval_lorsa(directory: str | Path, cfg: LorsaEvalConfig) -> dict:
    """Evaluate a `train lorsa` run directory (on its held-out documents) or a saved Lorsa directory."""
    lorsa, meta, run = open_lorsa(directory, cfg.device)
    lm = load_model(cfg.model or meta["model"], cfg.dtype, cfg.device)
    source = evaluation_text(directory, meta, run, lm, cfg.corpus, cfg.seed, cfg.context_length)
    return evaluate_lorsa(lorsa, lm, int(meta["layer"]), source, cfg.eval_tokens, cfg.lm_eval_tokens)
