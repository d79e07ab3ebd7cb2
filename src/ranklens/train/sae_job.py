"""`ranklens train sae` and `ranklens eval sae`: a sparse autoencoder on one site, trained and evaluated.

Steps, each resumable in the run directory:
1. activations: an existing store (`store`) or one collected into DIR/activations (`ranklens collect`);
2. initialization (App. E.3; ASI of Section 5.2 / App. K with V from a covariance accumulator over `init_tokens`
   tokens; the random-subspace control of App. J.1);
3. training with the shared Trainer (Adam or SparseAdam, AuxK, the App. E.1 schedule, K annealing);
4. the SAE saved in the SAELens layout (DIR/sae/cfg.json + sae_weights.safetensors);
5. evaluation on held-out documents (those after the training store's): FVU, L0, dead features over the evaluation
   tokens, and the spliced LM loss; written to DIR/metrics.json.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator

from ranklens.config import Config
from ranklens.data.collect import CollectConfig, collect
from ranklens.data.store import ActivationStore
from ranklens.data.stream import StreamSource
from ranklens.data.tokenize import DEFAULT_CONTEXT_LENGTH
from ranklens.dictionaries.init import (
    asi_basis,
    init_asi_,
    init_random_subspace_,
    init_standard_,
    resolve_d_init,
)
from ranklens.dictionaries.sae import SAEConfig, SparseAutoencoder
from ranklens.errors import RanklensError
from ranklens.eval.held_out import HeldOutSet, HeldOutSource
from ranklens.io import atomic_write_json, read_json
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.linalg.basis import principal_basis
from ranklens.lm.load import LoadedModel, load_model, resolve_dtype
from ranklens.lm.sites import Site, describe
from ranklens.rundir import prepare_run_dir
from ranklens.train.dead import dead_window
from ranklens.train.sae_objective import SAEObjective
from ranklens.train.schedules import capped_warmup
from ranklens.train.trainer import Trainer, TrainSettings

METRICS_NAME = "metrics.json"
SAE_DIR = "sae"


class SAETrainConfig(Config):
    model: str = "smollm2-135m"
    site: str = "L15.attn_out"
    corpus: str = "default"
    source: Literal["store", "stream"] = "store"  # store: train from an activation store; stream: on the fly
    store: str | None = None  # an activation store to train from; default: collected into DIR/activations
    stream_chunk_tokens: int = 262_144  # on the fly: tokens captured and shuffled together
    tokens: int = 2_000_000  # training tokens
    batch_size: int = 4096
    expansion: int = 8  # n_features = expansion * d
    n_features: int | None = None  # overrides expansion
    activation: Literal["topk", "batchtopk", "jumprelu", "relu"] = "topk"
    k: int = 50
    k_initial: int | None = None  # K annealing (App. L.2)
    k_anneal_fraction: float = 0.0
    l1_coefficient: float | None = None
    normalize_decoder: bool = False
    init: Literal["standard", "asi", "random-subspace"] = "standard"
    d_init: int | Literal["auto"] = "auto"
    init_tokens: int = 100_000  # tokens behind the ASI basis (a covariance accumulator, not one batch)
    # b_D's start: zero (App. E.3) or the mean of the first init_tokens training tokens. Why offer "mean": b_D moves
    # at most ~lr per Adam step, so in a short run the features must carry a large activation mean themselves.
    b_dec_init: Literal["zero", "mean"] = "zero"
    optimizer: Literal["adam", "sparseadam"] = "adam"
    bias_correction: Literal["per_row", "per_tensor"] = "per_row"
    lr: float = 4e-4
    warmup_steps: int = 500
    aux_k: int = 0  # 512 for the AuxK baseline
    aux_coefficient: float = 1 / 32
    dead_window_tokens: int | None = None  # default: dead_window(tokens)
    shuffle_buffer_tokens: int = 262_144
    eval_tokens: int = 100_000
    lm_eval_tokens: int = 16_384
    seed: int = 0
    context_length: int = DEFAULT_CONTEXT_LENGTH
    dtype: str = "auto"  # the language model's dtype
    train_dtype: Literal["float32", "bfloat16"] = "float32"  # bf16 = autocast of the SAE's matmuls
    device: str = "cpu"
    checkpoint_every: int = 500
    log_every: int = 50
    # Held-out FVU and dead features during training (DIR/curve.jsonl), at the first step reaching each count.
    curve_tokens: list[int] = []
    wandb_project: str | None = None

    @field_validator("curve_tokens", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [int(v) for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _k(cfg: SAETrainConfig) -> int | None:
    """k where the activation has one (TopK, BatchTopK)."""
    return cfg.k if cfg.activation in ("topk", "batchtopk") else None


def _stream(cfg: SAETrainConfig, lm: LoadedModel) -> StreamSource:
    return StreamSource(lm, cfg.site, cfg.corpus, seed=cfg.seed, context_length=cfg.context_length,
                        batch_size=cfg.batch_size, chunk_tokens=cfg.stream_chunk_tokens)


def _checks(cfg: SAETrainConfig, d: int) -> int:
    n_features = cfg.n_features or cfg.expansion * d
    if cfg.activation in ("topk", "batchtopk") and not 1 <= cfg.k <= n_features:
        raise RanklensError(f"--k {cfg.k} must be between 1 and the number of features {n_features}")
    if cfg.init != "standard" and cfg.d_init != "auto" and not 1 <= int(cfg.d_init) <= d:
        raise RanklensError(f"--d-init {cfg.d_init} must be between 1 and the site dimension d={d}")
    if cfg.tokens < cfg.batch_size:
        raise RanklensError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}")
    return n_features


def _store(cfg: SAETrainConfig, out: Path, lm: LoadedModel, progress: bool) -> ActivationStore:
    if cfg.store is not None:
        store = ActivationStore(cfg.store, require_complete=True)
        if cfg.site not in store.sites:
            raise RanklensError(f"store {cfg.store!r} holds sites {sorted(store.sites)}, not {cfg.site!r}")
        return store
    collect_cfg = CollectConfig(model=cfg.model, sites=cfg.site, corpus=cfg.corpus, tokens=cfg.tokens,
                                context_length=cfg.context_length, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
    return collect(collect_cfg, out / "activations", progress=progress, lm=lm)


def _take(chunks, n: int) -> torch.Tensor:
    """The first n rows of an iterator of activation chunks [m, d], as float32."""
    rows, seen = [], 0
    for chunk in chunks:
        rows.append(chunk.float())
        seen += chunk.shape[0]
        if seen >= n:
            break
    return torch.cat(rows)[:n]


def _mean(chunks, n: int) -> torch.Tensor:
    """Mean (float64) of the first n rows of an iterator of activation chunks [m, d]."""
    total, seen = None, 0
    for chunk in chunks:
        rows = chunk[: n - seen].double()
        total = rows.sum(0) if total is None else total + rows.sum(0)
        seen += rows.shape[0]
        if seen >= n:
            break
    return total / seen


def build_sae(cfg: SAETrainConfig, d: int, activations) -> tuple[SparseAutoencoder, dict]:
    """The SAE with the configured initialization; `activations()` gives a fresh iterator of training activation
    chunks [m, d] (the norm search uses one batch of them, ASI's covariance and b_D's mean `init_tokens`). Returns
    the SAE and a description of the init for the metrics."""
    n_features = _checks(cfg, d)
    sae_cfg = SAEConfig(d_in=d, n_features=n_features, activation=cfg.activation,
                        k=_k(cfg), normalize_decoder=cfg.normalize_decoder,
                        **({"l1_coefficient": cfg.l1_coefficient} if cfg.l1_coefficient is not None else {}))
    sae = SparseAutoencoder(sae_cfg).to(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    sample = _take(activations(), cfg.batch_size).to(cfg.device)
    info: dict = {"init": cfg.init, "d_init": None, "b_dec_init": cfg.b_dec_init}
    b_dec = _mean(activations(), cfg.init_tokens).to(cfg.device) if cfg.b_dec_init == "mean" else None
    init_standard_(sae, sample, generator=generator, b_dec=b_dec)
    if cfg.init == "standard":
        return sae, info
    acc = CovarianceAccumulator(d)
    for chunk in activations():
        acc.update(chunk[: cfg.init_tokens - acc.n])
        if acc.n >= cfg.init_tokens:
            break
    basis = principal_basis(acc)
    d_init = resolve_d_init(cfg.d_init, basis)
    info.update(d_init=d_init, init_tokens=acc.n)
    if cfg.init == "asi":
        init_asi_(sae, asi_basis(basis, d_init).to(cfg.device))
    else:
        init_random_subspace_(sae, d, d_init, generator=generator)
    return sae, info


def train_sae(cfg: SAETrainConfig, out: str | Path, progress: bool = True, lm: LoadedModel | None = None,
              held_out: HeldOutSet | None = None) -> dict:
    """Train (or resume, or reuse) the SAE of `cfg` in `out`; returns the metrics.json content.

    `lm` reuses a model the caller already loaded (it must be `cfg.model` in `cfg.dtype`); `held_out` reuses an
    evaluation set prepared for many runs (it must hold `cfg.site` over the text this run holds out, with the same
    token counts), so the metrics equal those of the run alone.
    """
    metrics_path = Path(out) / METRICS_NAME
    if metrics_path.exists():
        prepare_run_dir(out, cfg, "train-sae")  # refuses a directory of another run
        return read_json(metrics_path)
    lm = lm or load_model(cfg.model, cfg.dtype, cfg.device)
    arch = describe(lm.model)
    site = Site.parse(cfg.site)
    arch.check_site(site)
    _checks(cfg, arch.site_dim(site))  # bad combinations fail before anything is written
    out = prepare_run_dir(out, cfg, "train-sae")
    total_steps = cfg.tokens // cfg.batch_size
    d = arch.site_dim(site)
    if cfg.source == "stream":
        stream = _stream(cfg, lm)
        source = training_held_out(cfg, lm, out)
        sae, init_info = build_sae(cfg, d, lambda: stream(0))
        batches, store_tokens = stream, None
    else:
        store = _store(cfg, out, lm, progress)
        sae, init_info = build_sae(cfg, d, lambda: store.iter_tokens(cfg.site))

        def batches(start: int):
            return store.token_batches(cfg.site, cfg.batch_size, cfg.shuffle_buffer_tokens, cfg.seed,
                                       start_batch=start, epochs=None)

        store_tokens = store.n_tokens
        source = training_held_out(cfg, lm, out)
    held_out = _held_out_set(cfg, lm, source, held_out)  # also checks the corpus is long enough, up front
    window = cfg.dead_window_tokens or dead_window(cfg.tokens)
    warmup, warning = capped_warmup(cfg.warmup_steps, total_steps)
    if warning:
        print(f"ranklens: warning: {warning}", file=sys.stderr)
    settings = TrainSettings(total_steps=total_steps, lr=cfg.lr, optimizer=cfg.optimizer,
                             bias_correction=cfg.bias_correction, warmup_steps=warmup,
                             k=_k(cfg), k_initial=cfg.k_initial,
                             k_anneal_fraction=cfg.k_anneal_fraction, dead_window_tokens=window,
                             checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                             wandb_project=cfg.wandb_project)
    autocast = resolve_dtype(cfg.train_dtype)
    objective = SAEObjective(sae, aux_k=cfg.aux_k, aux_coefficient=cfg.aux_coefficient, autocast_dtype=autocast)
    trainer = Trainer(objective, settings, out, progress=progress)

    def curve_point() -> dict:
        r = held_out.reconstruction(sae, cfg.site)
        full = trainer.tracker.tokens_seen >= window  # the training count means something once a window has passed
        return {"fvu": r["nmse"], "l0": r["l0"], "eval_dead": r["eval_dead_features"], "eval_tokens": r["eval_tokens"],
                "train_dead": int(trainer.tracker.n_dead(window)) if full else None, "dead_window_tokens": window}

    trainer.train(batches, curve_point, curve_steps(cfg.curve_tokens, cfg.batch_size, total_steps))
    train_dead = int(trainer.tracker.n_dead(window))
    from ranklens.dictionaries.saelens import save_saelens

    save_saelens(sae, out / SAE_DIR, model=cfg.model, site=cfg.site, context_length=cfg.context_length,
                 corpus=cfg.corpus, extra={"ranklens_config": cfg.model_dump(mode="json"), **init_info})
    result = {"n_features": sae.n_features, "k": _k(cfg),
              "init": cfg.init, "d_init": init_info["d_init"], "b_dec_init": cfg.b_dec_init, "tokens": total_steps * cfg.batch_size,
              "optimizer": cfg.optimizer, "aux_k": cfg.aux_k, "dead_features": train_dead,
              "dead_fraction": train_dead / sae.n_features, "dead_window_tokens": window,
              "source": cfg.source, "store_tokens": store_tokens}
    result.update(held_out.evaluate(sae, cfg.site))
    atomic_write_json(metrics_path, result)
    return result


def curve_steps(tokens: list[int], batch_size: int, total_steps: int) -> list[int]:
    """The first step reaching each token count (within the run), plus the last step when any is asked for."""
    steps = {min(total_steps, max(1, -(-t // batch_size))) for t in tokens if t > 0}
    return sorted(steps | {total_steps}) if steps else []


def _held_out_set(cfg: SAETrainConfig, lm: LoadedModel, source: HeldOutSource, given: HeldOutSet | None,
                  ) -> HeldOutSet:
    if given is None:
        return HeldOutSet(lm, [cfg.site], source, cfg.eval_tokens, cfg.lm_eval_tokens)
    expected = (source, cfg.eval_tokens, cfg.lm_eval_tokens)
    if cfg.site not in given.sites or (given.source, given.eval_tokens, given.lm_eval_tokens) != expected:
        raise RanklensError(f"the given held-out set ({given.source}, {given.eval_tokens}/{given.lm_eval_tokens} "
                            f"tokens, sites {list(given.sites)}) is not this run's ({expected}, site {cfg.site})")
    return given


def training_held_out(cfg: SAETrainConfig, lm: LoadedModel, run_dir: Path) -> HeldOutSource:
    """The documents after those a training run consumes, never seen in training."""
    if cfg.source == "stream":
        stream = _stream(cfg, lm)
        n_chunks = -(-(cfg.tokens // cfg.batch_size) // stream.batches_per_chunk)
        start, corpus, seed, context = stream.chunk_documents(n_chunks)[-1], cfg.corpus, cfg.seed, cfg.context_length
    else:
        store = ActivationStore(cfg.store or Path(run_dir) / "activations")
        meta = store.meta
        start, corpus, seed, context = store.docs_consumed, meta["corpus"], meta["seed"], int(meta["context_length"])
    return HeldOutSource(corpus, int(seed), int(start), int(context))


def evaluate_sae(sae: SparseAutoencoder, lm: LoadedModel, site_name: str, source: HeldOutSource, eval_tokens: int,
                 lm_eval_tokens: int) -> dict:
    """FVU, L0 and dead features over `eval_tokens` held-out tokens, and the spliced LM loss over `lm_eval_tokens`
    (definitions in DESIGN.md); `source` must be text the SAE never trained on."""
    return HeldOutSet(lm, [site_name], source, eval_tokens, lm_eval_tokens).evaluate(sae, site_name)


class SAEEvalConfig(Config):
    model: str | None = None  # default: the training run's model
    site: str | None = None
    corpus: str | None = None
    seed: int = 1  # a different document order from training's default seed 0
    eval_tokens: int = 100_000
    lm_eval_tokens: int = 16_384
    context_length: int | None = None
    dtype: str = "auto"
    device: str = "cpu"


def eval_sae(directory: str | Path, cfg: SAEEvalConfig) -> dict:
    """Evaluate a ranklens SAE run directory, or any SAELens / LlamaScope SAE directory, on held-out text.

    For a ranklens run the held-out documents are those after the training store's; otherwise the corpus with
    `seed` (documents the SAE's trainer presumably never saw are the user's responsibility).
    """
    from ranklens.dictionaries.saelens import load_sae

    directory = Path(directory)
    run_cfg = None
    if (directory / "config.yaml").exists() and (directory / SAE_DIR).is_dir():
        import yaml

        run = yaml.safe_load((directory / "config.yaml").read_text())
        run_cfg = SAETrainConfig.build({k: v for k, v in run.items() if k != "job"}, source=str(directory))
        sae_dir = directory / SAE_DIR
    else:
        sae_dir = directory
    if not sae_dir.is_dir():
        raise RanklensError(f"{str(directory)!r} is not an SAE directory or a ranklens train-sae run")
    sae = load_sae(sae_dir, device=cfg.device)
    model = cfg.model or (run_cfg.model if run_cfg else None)
    site = cfg.site or (run_cfg.site if run_cfg else None)
    if model is None or site is None:
        raise RanklensError("--model and --site are needed to evaluate an SAE that is not a ranklens run")
    lm = load_model(model, cfg.dtype, cfg.device)
    if run_cfg is not None and cfg.corpus is None:
        source = training_held_out(run_cfg, lm, directory)
    else:
        corpus = cfg.corpus or (run_cfg.corpus if run_cfg else "default")
        context = cfg.context_length or (run_cfg.context_length if run_cfg else DEFAULT_CONTEXT_LENGTH)
        source = HeldOutSource(corpus, cfg.seed, 0, context)
    return evaluate_sae(sae, lm, site, source, cfg.eval_tokens, cfg.lm_eval_tokens)
