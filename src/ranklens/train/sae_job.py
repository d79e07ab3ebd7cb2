"""`ranklens train sae`: a sparse autoencoder on one site, trained and evaluated.

The job reads top to bottom: resolve the config against the model, open the model and the training data once
(``ranklens.data.sources``: an activation store, collected into DIR/activations when none is given, or activations
captured as training goes), build the SAE (App. E.3; ASI of Section 5.2 / App. K with V from a covariance
accumulator over ``init_tokens`` tokens; the random-subspace control of App. J.1), train it with the shared Trainer
(Adam or SparseAdam, AuxK, the App. E.1 schedule, K annealing, held-out curves), evaluate it on the documents after
the training data (``ranklens.eval.held_out``: FVU, L0, dead features, spliced LM loss), and write DIR/sae (the
SAELens layout) and DIR/metrics.json. Every step resumes in the run directory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ranklens.data.sources import StoreTokens, StreamTokens, sae_source
from ranklens.dictionaries.init import init_asi_, init_random_subspace_, init_standard_, resolve_d_init
from ranklens.dictionaries.sae import SAEConfig, SparseAutoencoder
from ranklens.dictionaries.saelens import save_saelens
from ranklens.dictionaries.sharded import ShardedSAE
from ranklens.distributed import Layout, rank_device, ranked_run_dir, world
from ranklens.errors import RanklensError
from ranklens.eval.held_out import HeldOutSet
from ranklens.eval.metrics import METRICS_FORMAT, upgrade_metrics
from ranklens.io import atomic_write_json, read_json
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.linalg.basis import active_subspace, principal_basis
from ranklens.lm.load import LoadedModel, load_model, resolve_dtype
from ranklens.lm.sites import Site
from ranklens.rundir import check_output_dir, prepare_run_dir
from ranklens.train.config import SAETrainConfig
from ranklens.train.dead import dead_window
from ranklens.train.sae_objective import SAEObjective
from ranklens.train.schedules import capped_warmup
from ranklens.train.trainer import Trainer, TrainSettings

METRICS_NAME = "metrics.json"
SAE_DIR = "sae"


def _k(cfg: SAETrainConfig) -> int | None:
    """k where the activation has one (TopK, BatchTopK)."""
    return cfg.k if cfg.activation in ("topk", "batchtopk") else None


def check_sizes(cfg: SAETrainConfig, d: int) -> int:
    """The number of features; refuses sizes that do not fit the site's dimension d."""
    n_features = cfg.n_features or cfg.expansion * d
    if _k(cfg) is not None and cfg.k > n_features:
        raise RanklensError(f"--k {cfg.k} must be at most the number of features {n_features}")
    if cfg.init != "standard" and cfg.d_init != "auto" and cfg.d_init > d:
        raise RanklensError(f"--d-init {cfg.d_init} must be between 1 and the site dimension d={d}")
    if cfg.tokens < cfg.batch_size:
        raise RanklensError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}")
    return n_features


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


def build_sae(cfg: SAETrainConfig, d: int, source: StoreTokens | StreamTokens) -> tuple[SparseAutoencoder, dict]:
    """The SAE with the configured initialization, from the start of the training data (``source.head()``: the
    norm search reads one batch of it, ASI's covariance and b_D's mean ``init_tokens``). Returns the SAE and a
    description of the init for the metrics."""
    sae_cfg = SAEConfig(d_in=d, n_features=check_sizes(cfg, d), activation=cfg.activation, k=_k(cfg),
                        normalize_decoder=cfg.normalize_decoder,
                        **({"l1_coefficient": cfg.l1_coefficient} if cfg.l1_coefficient is not None else {}))
    sae = SparseAutoencoder(sae_cfg).to(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    sample = _take(source.head(), cfg.batch_size).to(cfg.device)
    info: dict = {"init": cfg.init, "d_init": None, "b_dec_init": cfg.b_dec_init}
    b_dec = _mean(source.head(), cfg.init_tokens).to(cfg.device) if cfg.b_dec_init == "mean" else None
    init_standard_(sae, sample, generator=generator, b_dec=b_dec)
    if cfg.init == "standard":
        return sae, info
    acc = CovarianceAccumulator(d)
    for chunk in source.head():
        acc.update(chunk[: cfg.init_tokens - acc.n])
        if acc.n >= cfg.init_tokens:
            break
    basis = principal_basis(acc)
    d_init = resolve_d_init(cfg.d_init, basis)
    info.update(d_init=d_init, init_tokens=acc.n)
    if cfg.init == "asi":
        init_asi_(sae, active_subspace(basis, d_init).to(cfg.device))
    else:
        init_random_subspace_(sae, d, d_init, generator=generator)
    return sae, info


def data_seed(cfg: SAETrainConfig) -> int:
    """The seed of the data order: --data-seed, or --seed."""
    return cfg.seed if cfg.data_seed is None else cfg.data_seed


def curve_steps(tokens: list[int], batch_size: int, total_steps: int) -> list[int]:
    """The first step reaching each token count (within the run), plus the last step when any is asked for."""
    steps = {min(total_steps, max(1, -(-t // batch_size))) for t in tokens if t > 0}
    return sorted(steps | {total_steps}) if steps else []


def train_settings(cfg: SAETrainConfig, total_steps: int, window: int, site: str) -> TrainSettings:
    warmup, warning = capped_warmup(cfg.warmup_steps, total_steps)
    if warning:
        print(f"ranklens: warning: {warning}", file=sys.stderr)
    if total_steps * cfg.batch_size < cfg.tokens:  # said once, before training
        print(f"ranklens: note: training on {total_steps * cfg.batch_size:,} of the {cfg.tokens:,} tokens asked: "
              f"{total_steps} whole batches of {cfg.batch_size}", file=sys.stderr)
    return TrainSettings(total_steps=total_steps, lr=cfg.lr, optimizer=cfg.optimizer,
                         bias_correction=cfg.bias_correction, warmup_steps=warmup, k=_k(cfg), k_initial=cfg.k_initial,
                         k_anneal_fraction=cfg.k_anneal_fraction, dead_window_tokens=window,
                         checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                         wandb_project=cfg.wandb_project, what=f"the SAE on {site}")


def train_sae(cfg: SAETrainConfig, out: str | Path, progress: bool = True, lm: LoadedModel | None = None,
              held_out: HeldOutSet | None = None, layout: Layout | None = None) -> dict:
    """Train (or resume, or reuse) the SAE of `cfg` in `out`; returns the metrics.json content (on rank 0; the
    other ranks of a torchrun job return {}).

    `lm` reuses a model the caller already loaded (it must be `cfg.model` in `cfg.dtype`); `held_out` reuses an
    evaluation set prepared for many runs (it must hold the site over the text this run holds out, with the same
    token counts), so the metrics equal those of the run alone. Under torchrun (`layout`, made from the process
    group and ``cfg.shards`` when not given) the ranks share the batch (data parallel) and, with ``shards`` > 1, the
    features (``ranklens.train.sharded``).
    """
    if cfg.sites is not None:
        from ranklens.train.sae_group import train_sae_group

        if (layout.world if layout is not None else world()[1]) > 1:
            raise RanklensError("--sites trains its SAEs in one process (they share one forward per batch); under "
                                "torchrun train one site per job with --site")

        return train_sae_group(cfg, out, progress=progress, lm=lm)
    layout = layout or Layout(cfg.shards)
    if (Path(out) / METRICS_NAME).exists():
        prepare_run_dir(out, cfg, "train-sae")  # refuses a directory of another run
        return upgrade_metrics(read_json(Path(out) / METRICS_NAME)) if layout.main else {}
    check_output_dir(out)
    lm = lm or load_model(cfg.model, cfg.dtype, rank_device(cfg.device))
    site = lm.arch.site(cfg.site)
    check_sizes(cfg, lm.arch.site_dim(site))  # bad combinations fail before anything is written
    if layout.world > 1:
        check_layout(cfg, layout, lm.arch.site_dim(site))
    with ranked_run_dir(out, cfg, "train-sae", layout) as run_dir:
        return _train(cfg, run_dir, lm, site, progress, held_out, layout)


def check_layout(cfg: SAETrainConfig, layout: Layout, d: int) -> None:
    """What a torchrun job needs, checked on every rank before any work."""
    if cfg.source != "store" or cfg.store is None:
        raise RanklensError("training under torchrun reads an existing activation store (--store DIR; collect it "
                            "first, `torchrun ... ranklens collect` shares that work too)")
    layout.split(cfg.batch_size, "--batch-size")
    if layout.shards > 1:
        n_features = cfg.n_features or cfg.expansion * d
        if cfg.activation != "topk" or n_features % layout.shards:
            raise RanklensError(f"--shards {layout.shards} needs a TopK SAE whose {n_features} features split into "
                                "equal blocks; expected --activation topk and a multiple of --shards")
        if cfg.curve_tokens:
            raise RanklensError("--curve-tokens needs the whole dictionary on one rank; not with --shards")


def _train(cfg: SAETrainConfig, out: Path, lm: LoadedModel, site: Site, progress: bool,
           held_out: HeldOutSet | None, layout: Layout) -> dict:
    """Open the data, build, train, evaluate and write, in the run directory (locked by rank 0)."""
    source = sae_source(lm, site, kind=cfg.source, store=cfg.store, run_dir=out, corpus=cfg.corpus,
                        seed=data_seed(cfg), context_length=cfg.context_length, tokens=cfg.tokens,
                        batch_size=cfg.batch_size, buffer_tokens=cfg.shuffle_buffer_tokens,
                        chunk_tokens=cfg.stream_chunk_tokens, dtype=cfg.dtype, device=cfg.device, progress=progress)
    if layout.main:
        held_out = _held_out_set(cfg, lm, site.name, source, held_out, progress)  # also checks the corpus is long enough
    run = SAERun.build(cfg, out, lm, site, source, held_out, progress, layout)
    rows = layout.split(cfg.batch_size, "--batch-size")

    def shares(start: int):
        return (batch[rows] for batch in source(start))

    run.trainer.train(shares if layout.data > 1 else source, run.curve_point, run.curve_steps)
    return run.finish()


@dataclass
class SAERun:
    """One SAE being trained in its run directory: built, then trained (alone, or in a group), then finished."""

    cfg: SAETrainConfig
    out: Path
    site: Site
    sae: SparseAutoencoder
    init_info: dict
    trainer: Trainer
    window: int
    held_out: HeldOutSet
    source: Any  # the run's training data (``ranklens.data.sources``): total_steps, held_out, head()

    @classmethod
    def build(cls, cfg: SAETrainConfig, out: Path, lm: LoadedModel, site: Site, source, held_out: HeldOutSet | None,
              progress: bool, layout: Layout | None = None) -> SAERun:
        sae, init_info = build_sae(cfg, lm.arch.site_dim(site), source)
        if layout is not None and layout.shards > 1:
            sae = ShardedSAE(sae, layout)  # every rank built the same SAE; it keeps its block of features
        window = cfg.dead_window_tokens or dead_window(cfg.tokens)
        objective = SAEObjective(sae, aux_k=cfg.aux_k, aux_coefficient=cfg.aux_coefficient,
                                 autocast_dtype=resolve_dtype(cfg.train_dtype))
        trainer = Trainer(objective, train_settings(cfg, source.total_steps, window, site.name), out,
                          progress=progress, layout=layout)
        return cls(cfg, out, site, sae, init_info, trainer, window, held_out, source)

    @property
    def curve_steps(self) -> list[int]:
        return curve_steps(self.cfg.curve_tokens, self.cfg.batch_size, self.source.total_steps)

    def curve_point(self) -> dict:
        r = self.held_out.reconstruction(self.sae, self.site.name)
        tracker = self.trainer.tracker
        full = tracker.tokens_seen >= self.window  # the training count means something once a window has passed
        return {"fvu": r["fvu"], "l0": r["l0"], "eval_dead": r["eval_dead"], "eval_tokens": r["eval_tokens"],
                "train_dead": int(tracker.n_dead(self.window)) if full else None, "dead_window_tokens": self.window}

    def finish(self) -> dict:
        """Evaluate, save the SAE (SAELens layout) and write metrics.json; returns the metrics. A feature-sharded
        SAE is gathered first (every rank takes part), and rank 0 alone evaluates and writes."""
        cfg, sae, source = self.cfg, self.sae, self.source
        train_dead = self.trainer.n_dead()
        if isinstance(sae, ShardedSAE):
            sae = sae.gather()
        if not self.trainer.layout.main:
            return {}
        result = {"metrics_format": METRICS_FORMAT, "site": self.site.name, "n_features": sae.n_features, "k": _k(cfg),
                  **self.init_info, "tokens": source.total_steps * cfg.batch_size, "optimizer": cfg.optimizer,
                  "aux_k": cfg.aux_k, "train_dead": train_dead, "train_dead_fraction": train_dead / sae.n_features,
                  "dead_window_tokens": self.window, "source": cfg.source,
                  "store_tokens": source.store.n_tokens if isinstance(source, StoreTokens) else None,
                  "held_out": source.held_out.to_json()}
        result.update(self.held_out.evaluate(sae, self.site.name))
        save_saelens(sae, self.out / SAE_DIR, model=cfg.model, site=self.site.name, context_length=cfg.context_length,
                     corpus=cfg.corpus, extra={"ranklens_config": cfg.model_dump(mode="json"),
                                               "held_out": source.held_out.to_json(), **self.init_info})
        atomic_write_json(self.out / METRICS_NAME, result)
        return result


def _held_out_set(cfg: SAETrainConfig, lm: LoadedModel, site: str, source, given: HeldOutSet | None,
                  progress: bool) -> HeldOutSet:
    if given is None:
        return HeldOutSet(lm, [site], source.held_out, cfg.eval_tokens, cfg.lm_eval_tokens, progress=progress)
    expected = (source.held_out, cfg.eval_tokens, cfg.lm_eval_tokens)
    if site not in given.sites or (given.source, given.eval_tokens, given.lm_eval_tokens) != expected:
        raise RanklensError(f"the given held-out set ({given.source}, {given.eval_tokens}/{given.lm_eval_tokens} "
                            f"tokens, sites {list(given.sites)}) is not this run's ({expected}, site {site})")
    return given
