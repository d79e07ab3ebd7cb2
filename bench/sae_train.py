"""SAE training throughput: ranklens against sae-lens and eai-sparsify on the same activations and the same config.

Run with the bench environment (see bench/README.md, "SAE training throughput"), never with ranklens' own venv:

    bench/.venv/bin/python bench/sae_train.py                       # default: 4,608 and 36,864 features, fp32 and bf16
    THP_MEM_ALLOC_ENABLE=1 bench/.venv/bin/python bench/sae_train.py  # the same with huge pages in torch's allocator
    bench/.venv/bin/python bench/sae_train.py --retain-memory  # every library with glibc keeping freed memory (what
                                                               # the ranklens CLI sets for itself, ranklens.allocator)
    bench/.venv/bin/python bench/sae_train.py --profile --n-features 36864 --dtype bfloat16   # where ranklens' step goes

What is compared (one process, all libraries built from the SAME initial weights and fed the SAME batch tensors):

- TopK SAE, d_in = 576, k = 50, batch 4,096 tokens, torch.optim.Adam(lr=4e-4, betas=(0.9, 0.999), eps=1e-8), no AuxK,
  constant learning rate, encoder input x - b_dec in every library (sparsify always does this; sae-lens'
  apply_b_dec_to_input=True; ranklens' apply_b_dec_to_input=True), no decoder-norm constraint (sparsify
  normalize_decoder=False, sae-lens rescale_acts_by_decoder_norm=False, ranklens normalize_decoder=False).
- Initial weights: ranklens' standard initialization (paper App. E.3: uniform unit rows, W_E = W_D, decoder-norm grid
  search on centered activations), b_dec = mean of the first batch (what sparsify's trainer does at step 0), b_enc = 0;
  copied into the three libraries' parameters.
- One timed step = what the library's own trainer does per step, without logging, LR scheduler or data loading:
  * ranklens: ``Trainer._one_step(batch)`` with ``SAEObjective(sae, autocast_dtype=...)`` and ``make_optimizer("adam")``:
    zero_grad(set_to_none=True), SAEObjective.step_loss (topk_encode with its sparse backward, sparse_decode, FVU loss),
    backward, Adam.step(active_rows), FiringTracker.update.
  * sae-lens: the body of ``SAETrainer._train_step``: [autocast] ``TopKTrainingSAE.training_forward_pass`` (dense
    encoder matmul, torch.topk, scatter into a dense [B, n] code, dense decoder matmul, MSE summed over d and averaged
    over tokens), its dense firing bookkeeping, backward, ``clip_grad_norm_(1.0)``, Adam.step, zero_grad.
  * sparsify: the body of ``Trainer.fit`` for loss_fn="fvu": total variance of the batch, [autocast]
    ``SparseCoder.forward`` (fused encoder whose backward uses embedding_bag + index_add_, embedding_bag decoder; the
    Triton decoder is absent on CPU), did_fire update, fvu.backward(), Adam.step, zero_grad.
- bf16: each library's own mixed-precision mechanism, fp32 master weights and fp32 Adam in all three:
  * ranklens: ``SAEObjective(autocast_dtype=torch.bfloat16)`` = torch.autocast("cpu", bf16) around encode + decode;
    the TopK encoder casts its input to the autocast dtype itself (its product is an out= op autocast skips).
  * sae-lens: ``LanguageModelSAERunnerConfig(autocast=True)`` = torch.autocast(device, bf16) around
    training_forward_pass and the firing bookkeeping (SAETrainer.__init__).
  * sparsify: its forward is decorated with torch.autocast("cuda", bf16), a no-op on CPU; we apply the same
    torch.autocast on "cpu" around the forward (its trainer keeps fp32 parameters).
  ``--show-dtypes`` prints which dtype every aten op ran in for one step of each library.
- Timing: ``--warmup`` untimed steps per library, then ``--repeats`` rounds; each round runs ``--steps-per-repeat``
  steps of every library in a rotated order (ABC, BCA, CAB, ...), so drifting load hits all alike. Per-step wall time
  (perf_counter) and process CPU time; tokens/s = batch / median step time. The load average is recorded.
- Bound: every round also times the encoder's forward matmul alone (``encoder_bound``: x @ W_E^T at the cell's
  shape and matmul dtype); share of bound = its median time / a library's median step time (1.0 = a step that
  costs nothing beyond that one product).
- FVU: after the timing each library continues untimed to ``--fvu-steps`` steps (same batches, same order), then
  FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 on a held-out chunk (the last tokens of the store in storage
  order, never trained on), x_hat from each library's own fp32 forward. nmse_uncentered = sum ||x - x_hat||^2 /
  sum ||x||^2 is reported too.

Results go to stdout (a markdown table) and to bench/results/sae_train.json (one entry per allocator setting, so
the runs sit side by side).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ranklens.allocator import retain_freed_memory

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_STORE = REPO / "runs" / "exp" / "l15_attn_out_store"
RESULTS = BENCH_DIR / "results" / "sae_train.json"
SITE = "L15.attn_out"


# --------------------------------------------------------------------------------------------------------------- data


def load_activations(store_path: Path, site: str, max_tokens: int | None) -> tuple[torch.Tensor, dict]:
    from ranklens.data.store import ActivationStore

    store = ActivationStore(store_path)
    chunks: list[torch.Tensor] = []
    n = 0
    for chunk in store.iter_tokens(site):
        chunks.append(chunk.to(torch.float32))
        n += chunk.shape[0]
        if max_tokens is not None and n >= max_tokens:
            break
    x = torch.cat(chunks)
    if max_tokens is not None:
        x = x[:max_tokens]
    info = {
        "store": str(store_path),
        "site": site,
        "store_complete": bool(store.complete),
        "store_tokens": int(store.n_tokens),
        "tokens_used": int(x.shape[0]),
        "store_dtype": str(store.dtype),
        "meta": store.meta,
    }
    return x.contiguous(), info


class Batches:
    """Identical batches for every library: a fixed token permutation of the training part, reshuffled per epoch."""

    def __init__(self, train: torch.Tensor, batch: int, seed: int) -> None:
        self.train = train
        self.batch = batch
        self.seed = seed
        self.per_epoch = train.shape[0] // batch
        if self.per_epoch < 1:
            raise SystemExit(f"only {train.shape[0]} training tokens; need at least one batch of {batch}")
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, i: int) -> torch.Tensor:
        # Materialized once and shared, so every library gets the very same tensor object for step i.
        if i not in self._cache:
            epoch, j = divmod(i, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.train.shape[0], generator=g)
            self._cache[i] = self.train[perm[j * self.batch : (j + 1) * self.batch]].contiguous()
        return self._cache[i]


def fvu_of(reconstruct: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 4096) -> dict:
    err = 0.0
    x64 = x.double()
    total_c = (x64 - x64.mean(0)).pow(2).sum().item()
    total_u = x64.pow(2).sum().item()
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xc = x[i : i + chunk]
            err += (xc.double() - reconstruct(xc).double()).pow(2).sum().item()
    return {"fvu": err / total_c, "nmse_uncentered": err / total_u}


# ---------------------------------------------------------------------------------------------------------- runners


class Runner:
    name: str
    timed_step: str

    def step(self, x: torch.Tensor) -> dict[str, float]:  # returns phase times (may be empty)
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _autocast(dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


class RanklensRunner(Runner):
    def __init__(
        self,
        init: dict,
        k: int,
        lr: float,
        dtype: torch.dtype,
        optimizer: str = "adam",
        aux_k: int = 0,
        dead_mask: torch.Tensor | None = None,
    ) -> None:
        from ranklens.dictionaries.sae import SAEConfig, SparseAutoencoder
        from ranklens.train.sae_objective import SAEObjective
        from ranklens.train.trainer import Trainer, TrainSettings

        n, d = init["W_D"].shape
        self.name = "ranklens" if optimizer == "adam" else f"ranklens+{optimizer}"
        self.sae = SparseAutoencoder(
            SAEConfig(d_in=d, n_features=n, activation="topk", k=k, apply_b_dec_to_input=True)
        )
        with torch.no_grad():
            self.sae.W_E.copy_(init["W_E"])
            self.sae.b_E.copy_(init["b_E"])
            self.sae.W_D.copy_(init["W_D"])
            self.sae.b_D.copy_(init["b_D"])
        autocast = None if dtype == torch.float32 else dtype
        self.objective = SAEObjective(self.sae, aux_k=aux_k, aux_coefficient=1 / 32, autocast_dtype=autocast)
        self._tmp = tempfile.TemporaryDirectory(prefix="sae_train_bench_")
        settings = TrainSettings(
            total_steps=10**9,
            lr=lr,
            optimizer=optimizer,
            warmup_steps=0,
            decay_fraction=0.0,
            k=k,
            checkpoint_every=10**9,
            log_every=10**9,
        )
        self.trainer = Trainer(self.objective, settings, Path(self._tmp.name), progress=False)
        if dead_mask is not None:  # AuxK timing: a fixed set of "dead" features, the same for every library
            self.trainer.tracker.dead_mask = lambda window: dead_mask  # type: ignore[method-assign]
        self.timed_step = (
            f"Trainer._one_step: zero_grad(set_to_none=True), SAEObjective.step_loss "
            f"(autocast={autocast}), backward, {optimizer}.step(active_rows), FiringTracker.update"
        )

    def step(self, x: torch.Tensor) -> dict[str, float]:
        self.trainer._one_step(x)
        self.trainer.step += 1
        return {}

    def step_phased(self, x: torch.Tensor) -> dict[str, float]:
        """The same work as Trainer._one_step, written out with a timer per phase (for --profile)."""
        from ranklens.train.trainer import StepContext

        tr = self.trainer
        t0 = time.perf_counter()
        for group in tr.optimizer.param_groups:
            group["lr"] = tr._lr()
        ctx = StepContext(tr.step, tr.current_k(), tr.tracker.dead_mask(tr.settings.dead_window_tokens))
        tr.optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        result = self.objective.step_loss(x, ctx)
        t2 = time.perf_counter()
        result.loss.backward()
        t3 = time.perf_counter()
        tr.optimizer.step(active_rows=result.active)
        self.objective.after_step()
        t4 = time.perf_counter()
        tr.tracker.update(result.active, result.n_tokens)
        float(result.loss)
        tr.step += 1
        t5 = time.perf_counter()
        return {
            "zero_grad+ctx": t1 - t0,
            "forward+loss": t2 - t1,
            "backward": t3 - t2,
            "optimizer": t4 - t3,
            "bookkeeping": t5 - t4,
        }

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae(x)[0]


class SaeLensRunner(Runner):
    def __init__(
        self,
        init: dict,
        k: int,
        lr: float,
        dtype: torch.dtype,
        aux: bool = False,
        dead_mask: torch.Tensor | None = None,
    ) -> None:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        n, d = init["W_D"].shape
        self.name = "sae-lens"
        cfg = TopKTrainingSAEConfig(
            d_in=d,
            d_sae=n,
            k=k,
            dtype="float32",
            device="cpu",
            apply_b_dec_to_input=True,
            rescale_acts_by_decoder_norm=False,
            aux_loss_coefficient=1 / 32 if aux else 0.0,
            normalize_activations="none",
        )
        self.sae = TopKTrainingSAE(cfg)
        with torch.no_grad():
            self.sae.W_enc.copy_(init["W_E"].t())
            self.sae.b_enc.copy_(init["b_E"])
            self.sae.W_dec.copy_(init["W_D"])
            self.sae.b_dec.copy_(init["b_D"])
        # SAETrainer: Adam(sae.parameters(), lr, betas=(adam_beta1, adam_beta2)), defaults 0.9 / 0.999.
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr, betas=(0.9, 0.999))
        self.dtype = dtype
        self.dead_mask = dead_mask
        self.n_steps = 0
        self.n_forward_passes_since_fired = torch.zeros(n)
        self.act_freq_scores = torch.zeros(n)
        self.timed_step = (
            "SAETrainer._train_step body: [torch.autocast(cpu, bf16) if bf16] "
            "TopKTrainingSAE.training_forward_pass + dense firing bookkeeping, backward, "
            "clip_grad_norm_(1.0), Adam.step, zero_grad"
        )

    def step(self, x: torch.Tensor) -> dict[str, float]:
        from sae_lens.saes.sae import TrainStepInput

        t0 = time.perf_counter()
        self.sae.train()
        with _autocast(self.dtype):
            out = self.sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=x,
                    coefficients={},
                    dead_neuron_mask=self.dead_mask,
                    n_training_steps=self.n_steps,
                    is_logging_step=False,
                )
            )
            t1 = time.perf_counter()
            with torch.no_grad():  # SAETrainer's dead-feature bookkeeping, verbatim
                firing_feats = out.feature_acts.bool().float()
                did_fire = firing_feats.sum(-2).bool()
                self.n_forward_passes_since_fired += 1
                self.n_forward_passes_since_fired[did_fire] = 0
                self.act_freq_scores += firing_feats.sum(0)
        t2 = time.perf_counter()
        out.loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.n_steps += 1
        t4 = time.perf_counter()
        return {"forward+loss": t1 - t0, "bookkeeping": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        self.sae.eval()
        return self.sae(x)


class SparsifyRunner(Runner):
    def __init__(
        self,
        init: dict,
        k: int,
        lr: float,
        dtype: torch.dtype,
        aux: bool = False,
        dead_mask: torch.Tensor | None = None,
    ) -> None:
        from sparsify import SparseCoder, SparseCoderConfig

        n, d = init["W_D"].shape
        self.name = "sparsify"
        cfg = SparseCoderConfig(activation="topk", num_latents=n, k=k, normalize_decoder=False)
        self.sae = SparseCoder(d, cfg, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            self.sae.encoder.weight.copy_(init["W_E"])
            self.sae.encoder.bias.copy_(init["b_E"])
            self.sae.W_dec.copy_(init["W_D"])
            self.sae.b_dec.copy_(init["b_D"])
        # sparsify's Trainer with optimizer="adam" and no bitsandbytes: torch.optim.Adam([{params, lr}]).
        self.opt = torch.optim.Adam([{"params": self.sae.parameters(), "lr": lr}])
        self.dtype = dtype
        self.dead_mask = dead_mask
        self.auxk_alpha = 1 / 32 if aux else 0.0
        self.did_fire = torch.zeros(n, dtype=torch.bool)
        self.timed_step = (
            "Trainer.fit body (loss_fn=fvu): total variance, [torch.autocast(cpu, bf16) if bf16] "
            "SparseCoder.forward (FusedEncoder: embedding_bag/index_add_ backward; eager "
            "embedding_bag decoder), did_fire update, fvu.backward(), Adam.step, zero_grad"
        )

    def step(self, x: torch.Tensor) -> dict[str, float]:
        t0 = time.perf_counter()
        total_variance = (x - x.mean(0)).pow(2).sum()
        with _autocast(self.dtype):
            out = self.sae(x=x, y=x, dead_mask=self.dead_mask, total_variance=total_variance)
        t1 = time.perf_counter()
        self.did_fire[out.latent_indices.flatten()] = True
        t2 = time.perf_counter()
        loss = out.fvu + self.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        t3 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad()
        t4 = time.perf_counter()
        return {"forward+loss": t1 - t0, "bookkeeping": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae(x).sae_out


# --------------------------------------------------------------------------------------------------------- the runs


def make_init(x_sample: torch.Tensor, first_batch: torch.Tensor, n: int, k: int, seed: int) -> dict:
    """ranklens' standard init (App. E.3) fitted on the centered sample; b_dec = mean of the first batch."""
    from ranklens.dictionaries.init import init_standard_
    from ranklens.dictionaries.sae import SAEConfig, SparseAutoencoder

    d = x_sample.shape[1]
    mean = first_batch.mean(0)
    sae = SparseAutoencoder(
        SAEConfig(d_in=d, n_features=n, activation="topk", k=k, apply_b_dec_to_input=True)
    )
    search = init_standard_(sae, x_sample - mean, generator=torch.Generator().manual_seed(seed))
    init = {name: p.detach().clone() for name, p in sae.named_parameters()}
    init["b_D"] = mean.clone()
    init["norm"] = search.norm
    return init


def build(
    lib: str, init: dict, args: argparse.Namespace, dtype: torch.dtype, dead_mask: torch.Tensor | None
) -> Runner:
    if lib == "ranklens":
        return RanklensRunner(
            init,
            args.k,
            args.lr,
            dtype,
            aux_k=args.d_in // 2 if dead_mask is not None else 0,
            dead_mask=dead_mask,
        )
    if lib == "ranklens+sparseadam":
        return RanklensRunner(
            init,
            args.k,
            args.lr,
            dtype,
            optimizer="sparseadam",
            aux_k=args.d_in // 2 if dead_mask is not None else 0,
            dead_mask=dead_mask,
        )
    if lib == "sae-lens":
        return SaeLensRunner(init, args.k, args.lr, dtype, aux=dead_mask is not None, dead_mask=dead_mask)
    if lib == "sparsify":
        return SparsifyRunner(init, args.k, args.lr, dtype, aux=dead_mask is not None, dead_mask=dead_mask)
    raise SystemExit(f"unknown library {lib!r}")


def _median(v: list[float]) -> float:
    return statistics.median(v) if v else float("nan")


def _quantile(v: list[float], q: float) -> float:
    if not v:
        return float("nan")
    s = sorted(v)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def encoder_bound(n: int, d: int, dtype: torch.dtype, batch: int, seed: int) -> Callable[[torch.Tensor], None]:
    """The physical bound of a TopK SAE step (issue 18): the encoder's forward product x @ W_E^T alone, [B, d] x
    [d, n] in the dtype the step's matmul runs in (bf16 under autocast), into a preallocated output: no allocation,
    no top-k, no decoder, no backward, no optimizer. No trainer can step faster than this product runs."""
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out = torch.empty(batch, n, dtype=dtype)

    def run(x: torch.Tensor) -> None:
        torch.mm(x.to(dtype), w.t(), out=out)

    return run


def run_config(
    n: int,
    dtype: torch.dtype,
    args: argparse.Namespace,
    batches: Batches,
    x_sample: torch.Tensor,
    x_eval: torch.Tensor,
    auxk: bool,
) -> dict:
    torch.manual_seed(args.seed)
    init = make_init(x_sample, batches(0), n, args.k, args.seed)
    dead_mask = None
    if auxk:
        g = torch.Generator().manual_seed(args.seed + 1)
        dead_mask = torch.rand(n, generator=g) < args.auxk_dead_fraction
    libs = list(args.libs)
    runners = [build(lib, init, args, dtype, dead_mask) for lib in libs]
    init_norm = float(init["norm"])
    del init
    label = f"n={n} {str(dtype).replace('torch.', '')}{' +AuxK' if auxk else ''}"
    print(f"\n## {label}: warm-up {args.warmup} steps each", flush=True)
    pos = {r.name: 0 for r in runners}
    for r in runners:
        for _ in range(args.warmup):
            r.step(batches(pos[r.name]))
            pos[r.name] += 1
    bound = encoder_bound(n, args.d_in, dtype, args.batch, args.seed)
    for _ in range(args.warmup):
        bound(batches(0))
    bound_wall: list[float] = []
    wall: dict[str, list[float]] = {r.name: [] for r in runners}
    cpu: dict[str, list[float]] = {r.name: [] for r in runners}
    phases: dict[str, dict[str, list[float]]] = {r.name: {} for r in runners}
    load = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        order = runners[rep % len(runners) :] + runners[: rep % len(runners)]
        for r in order:
            for _ in range(args.steps_per_repeat):
                x = batches(pos[r.name])
                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                ph = r.step(x)
                t1, c1 = time.perf_counter(), time.process_time()
                pos[r.name] += 1
                wall[r.name].append(t1 - t0)
                cpu[r.name].append(c1 - c0)
                for key, v in ph.items():
                    phases[r.name].setdefault(key, []).append(v)
        for i in range(args.steps_per_repeat):  # the bound, timed in the same rounds as the libraries
            x = batches(i)
            t0 = time.perf_counter()
            bound(x)
            bound_wall.append(time.perf_counter() - t0)
        load.append(os.getloadavg()[0])
        line = "  ".join(
            f"{r.name} {args.batch / _median(wall[r.name][-args.steps_per_repeat :]):8.0f}" for r in runners
        )
        print(f"  round {rep + 1}/{args.repeats}  tok/s  {line}  (load {load[-1]:.2f})", flush=True)
    out: dict = {
        "n_features": n,
        "dtype": str(dtype).replace("torch.", ""),
        "auxk": auxk,
        "auxk_dead_fraction": args.auxk_dead_fraction if auxk else None,
        "init_decoder_norm": init_norm,
        "load_avg_1min": {"min": min(load), "median": _median(load), "max": max(load)},
        "libs": {},
    }
    bound_med = _median(bound_wall)
    out["bound"] = {"what": "encoder forward matmul alone (x @ W_E^T, preallocated output)",
                    "step_s_median": bound_med, "tokens_per_s": args.batch / bound_med,
                    "tflops": 2 * args.batch * n * args.d_in / bound_med / 1e12}
    for r in runners:
        w = wall[r.name]
        med = _median(w)
        out["libs"][r.name] = {
            "share_of_bound": bound_med / med,
            "tokens_per_s": args.batch / med,
            "tokens_per_s_p25_p75": [args.batch / _quantile(w, 0.75), args.batch / _quantile(w, 0.25)],
            "step_s_median": med,
            "cpu_cores_used_median": _median([c / t for c, t in zip(cpu[r.name], w, strict=True)]),
            "timed_steps": len(w),
            "step_s": [round(t, 4) for t in w],
            "phases_s_median": {key: _median(v) for key, v in phases[r.name].items()},
            "timed_step": r.timed_step,
        }
    # Equal tokens: every library continues (untimed, same batches) to fvu_steps, then FVU on the held-out chunk.
    fvu_steps = args.fvu_steps[args.n_features.index(n)] if len(args.fvu_steps) > 1 else args.fvu_steps[0]
    if fvu_steps and not auxk:
        print(f"  continuing each library to {fvu_steps} steps for the FVU check", flush=True)
        for r in runners:
            while pos[r.name] < fvu_steps:
                r.step(batches(pos[r.name]))
                pos[r.name] += 1
    for r in runners:
        res = fvu_of(r.reconstruct, x_eval)
        out["libs"][r.name].update(
            {**res, "trained_steps": pos[r.name], "trained_tokens": pos[r.name] * args.batch}
        )
    peers = [r.name for r in runners if r.name in ("sae-lens", "sparsify")]
    if "ranklens" in out["libs"] and peers:
        fastest = max(peers, key=lambda p: out["libs"][p]["tokens_per_s"])
        out["faster_peer"] = fastest
        out["ratio_ranklens_over_faster_peer"] = (
            out["libs"]["ranklens"]["tokens_per_s"] / out["libs"][fastest]["tokens_per_s"]
        )
        # Paired by round: each round's ranklens median against the same round's peer median (adjacent in time, so
        # a load change between rounds cancels); the median over rounds.
        m = args.steps_per_repeat
        rounds = [
            _median(wall[fastest][i : i + m]) / _median(wall["ranklens"][i : i + m])
            for i in range(0, len(wall["ranklens"]), m)
        ]
        out["ratio_ranklens_over_faster_peer_paired_rounds"] = _median(rounds)
        out["ratio_per_round"] = [round(v, 3) for v in rounds]
        fvus = [out["libs"][name]["fvu"] for name in ["ranklens", *peers]]
        out["fvu_spread_rel"] = (max(fvus) - min(fvus)) / min(fvus)
    for r in runners:
        lib = out["libs"][r.name]
        print(
            f"  {r.name:20s} {lib['tokens_per_s']:9.0f} tok/s  (p25-p75 {lib['tokens_per_s_p25_p75'][0]:.0f}-"
            f"{lib['tokens_per_s_p25_p75'][1]:.0f}, {lib['cpu_cores_used_median']:.2f} cores, "
            f"{lib['share_of_bound']:.0%} of the bound)  "
            f"FVU {lib['fvu']:.4f} after {lib['trained_steps']} steps  phases "
            + " ".join(f"{k}={v * 1e3:.0f}ms" for k, v in lib["phases_s_median"].items()),
            flush=True,
        )
    del runners
    gc.collect()
    return out


# ------------------------------------------------------------------------------------------------------ diagnostics


def show_dtypes(args: argparse.Namespace, batches: Batches, x_sample: torch.Tensor) -> None:
    """Print the dtype every matmul-like / top-k op ran in, for one bf16 step of each library."""
    from torch.profiler import ProfilerActivity, profile

    n = args.n_features[0]
    init = make_init(x_sample, batches(0), n, args.k, args.seed)
    for lib in args.libs:
        r = build(lib, init, args, torch.bfloat16, None)
        r.step(batches(0))
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            r.step(batches(1))
        seen: dict[str, set] = {}
        for ev in prof.events():
            name = ev.name
            if any(
                s in name
                for s in (
                    "mm",
                    "linear",
                    "topk",
                    "embedding_bag",
                    "index_add",
                    "mse",
                    "matmul",
                    "sampled",
                    "scatter",
                    "_to_copy",
                )
            ):
                shapes = ev.input_shapes
                dt = getattr(ev, "input_dtypes", None) or getattr(ev, "dtypes", None)
                seen.setdefault(name, set()).add(f"{shapes} {dt}")
        print(f"\n### {lib} (bf16 step): op -> input shapes / dtypes")
        for name, s in sorted(seen.items()):
            for item in sorted(s)[:4]:
                print(f"  {name:40s} {item}")


def profile_ranklens(args: argparse.Namespace, batches: Batches, x_sample: torch.Tensor) -> None:
    """Median phase timings and a torch.profiler op table of one step, for each library in --libs (ranklens' phases
    come from ``step_phased``, the same work as ``Trainer._one_step`` with a timer between the phases)."""
    from torch.profiler import ProfilerActivity, profile

    for n in args.n_features:
        for dtype in args.dtypes:
            init = make_init(x_sample, batches(0), n, args.k, args.seed)
            for lib in args.libs:
                r = build(lib, init, args, dtype, None)
                step = r.step_phased if isinstance(r, RanklensRunner) else r.step
                for i in range(args.warmup):
                    step(batches(i))
                ph: dict[str, list[float]] = {}
                for i in range(args.warmup, args.warmup + args.steps_per_repeat):
                    t0 = time.perf_counter()
                    for key, v in step(batches(i)).items():
                        ph.setdefault(key, []).append(v)
                    ph.setdefault("TOTAL", []).append(time.perf_counter() - t0)
                tot = _median(ph["TOTAL"])
                print(
                    f"\n## {lib} n={n} {dtype}: median phase times over {args.steps_per_repeat} steps "
                    f"(total {tot * 1e3:.0f} ms = {args.batch / tot:.0f} tok/s; load {os.getloadavg()[0]:.2f})"
                )
                for key, v in ph.items():
                    print(f"  {key:16s} {_median(v) * 1e3:8.1f} ms")
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    for i in range(3):
                        step(batches(args.warmup + args.steps_per_repeat + i))
                print(f"\n### torch.profiler, {lib}, n={n} {dtype}, 3 steps, by self CPU time (top 30)")
                print(
                    prof.key_averages(group_by_input_shape=True).table(
                        sort_by="self_cpu_time_total",
                        row_limit=30,
                        max_name_column_width=44,
                        max_shapes_column_width=60,
                    )
                )
                del r, prof
                gc.collect()


# --------------------------------------------------------------------------------------------------------- output


def versions() -> dict:
    from importlib.metadata import version

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for pkg in ("sae-lens", "eai-sparsify", "transformer-lens", "ranklens"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = None
    try:
        import subprocess

        out["ranklens_git"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return out


def markdown(results: dict) -> str:
    lines = []
    for key, run in sorted(results.get("runs", {}).items()):
        lines.append(
            f"\n### {key} (torch {run['versions']['torch']}, sae-lens {run['versions']['sae-lens']}, "
            f"eai-sparsify {run['versions']['eai-sparsify']}; {run['data']['tokens_used']} tokens of "
            f"{run['data']['site']})\n"
        )
        libs = [
            lib
            for lib in ("ranklens", "sae-lens", "sparsify", "ranklens+sparseadam")
            if any(lib in c["libs"] for c in run["configs"])
        ]
        head = (
            "| features | dtype | AuxK | "
            + " | ".join(f"{lib} tok/s" for lib in libs)
            + " | bound tok/s (TFLOP/s) | ranklens share of bound | ranklens / faster peer | "
            + " | ".join(f"FVU {lib}" for lib in libs)
            + " | load |"
        )
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for c in run["configs"]:
            cells = [str(c["n_features"]), c["dtype"], "yes" if c["auxk"] else "no"]
            cells += [f"{c['libs'][lib]['tokens_per_s']:.0f}" if lib in c["libs"] else "" for lib in libs]
            b = c.get("bound")
            cells.append(f"{b['tokens_per_s']:.0f} ({b['tflops']:.2f})" if b else "")
            share = c["libs"].get("ranklens", {}).get("share_of_bound")
            cells.append(f"{share:.0%}" if share else "")
            ratio = c.get("ratio_ranklens_over_faster_peer")
            paired = c.get("ratio_ranklens_over_faster_peer_paired_rounds")
            paired_s = f", paired by round {paired:.2f}" if paired else ""
            cells.append(f"{ratio:.2f} (vs {c['faster_peer']}{paired_s})" if ratio else "")
            cells += [f"{c['libs'][lib]['fvu']:.4f}" if lib in c["libs"] else "" for lib in libs]
            la = c["load_avg_1min"]
            cells.append(f"{la['min']:.1f}-{la['max']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(key: str, run: dict) -> dict:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"runs": {}}
    if RESULTS.exists():
        with contextlib.suppress(json.JSONDecodeError):
            results = json.loads(RESULTS.read_text())
    # Merge by configuration: a run of some configs keeps the other configs of an earlier run under the same key.
    previous = results.setdefault("runs", {}).get(key)
    if previous:
        mine = {(c["n_features"], c["dtype"], c["auxk"]) for c in run["configs"]}
        kept = [
            c for c in previous.get("configs", []) if (c["n_features"], c["dtype"], c["auxk"]) not in mine
        ]
        run = {
            **run,
            "configs": sorted(kept + run["configs"], key=lambda c: (c["n_features"], c["dtype"], c["auxk"])),
        }
    results["runs"][key] = run
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(RESULTS)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=DEFAULT_STORE)
    p.add_argument("--site", default=SITE)
    p.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of the store")
    p.add_argument(
        "--eval-tokens", type=int, default=32768, help="held-out tokens (the store's last, never trained on)"
    )
    p.add_argument("--n-features", type=int, nargs="+", default=[4608, 36864])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument(
        "--libs",
        nargs="+",
        default=["ranklens", "sae-lens", "sparsify"],
        choices=["ranklens", "sae-lens", "sparsify", "ranklens+sparseadam"],
    )
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--steps-per-repeat", type=int, default=5)
    p.add_argument(
        "--fvu-steps",
        type=int,
        nargs="+",
        default=[100],
        help="steps of every library before the FVU check: one value, or one per --n-features (0: skip)",
    )
    p.add_argument(
        "--auxk", action="store_true", help="also time a row with AuxK on a fixed random 'dead' set"
    )
    p.add_argument("--auxk-dead-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--retain-memory",
        action="store_true",
        help="keep freed memory in the process for every library (ranklens.allocator, what the ranklens CLI does)",
    )
    p.add_argument("--tag", default=None, help="results key (default: thp=on/off, plus 'retain' with --retain-memory)")
    p.add_argument("--profile", action="store_true", help="profile ranklens' step instead of benchmarking")
    p.add_argument(
        "--show-dtypes", action="store_true", help="print the dtypes each library's bf16 step runs in"
    )
    args = p.parse_args()
    args.d_in = None
    args.dtypes_t = [getattr(torch, d) for d in args.dtypes]

    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1"
    retain = args.retain_memory and retain_freed_memory()
    if args.retain_memory and not retain:
        raise SystemExit("--retain-memory: glibc's mallopt is not available here")
    print(f"versions: {versions()}  THP_MEM_ALLOC_ENABLE={int(thp)}  retain={retain}  load {os.getloadavg()}",
          flush=True)
    x, data_info = load_activations(args.store, args.site, args.max_tokens)
    args.d_in = x.shape[1]
    x_eval = x[-args.eval_tokens :].clone()
    train = x[: -args.eval_tokens]
    del x
    batches = Batches(train, args.batch, args.seed)
    x_sample = batches(0)  # the init's norm search sees the first batch (as a trainer would)
    data_info.update(
        {
            "train_tokens": int(train.shape[0]),
            "eval_tokens": int(x_eval.shape[0]),
            "batches_per_epoch": batches.per_epoch,
        }
    )
    print(f"data: {data_info}", flush=True)
    if len(args.fvu_steps) not in (1, len(args.n_features)):
        raise SystemExit(f"--fvu-steps {args.fvu_steps}: expected one value or one per --n-features")
    if max(args.fvu_steps) > batches.per_epoch:
        print(
            f"note: {max(args.fvu_steps)} FVU steps > {batches.per_epoch} batches per epoch; later ones reshuffle"
        )

    if args.show_dtypes:
        args.dtypes = ["bfloat16"]
        show_dtypes(args, batches, x_sample)
        return
    if args.profile:
        args.dtypes = args.dtypes_t
        profile_ranklens(args, batches, x_sample)
        return

    run = {
        "versions": versions(),
        "thp_mem_alloc_enable": thp,
        "retain_freed_memory": retain,
        "data": data_info,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("dtypes_t", "store")},
        "configs": [],
    }
    run["settings"]["store"] = str(args.store)
    key = args.tag or f"thp={'on' if thp else 'off'}" + (" retain" if retain else "")
    started = time.time()
    for n in args.n_features:
        for dtype in args.dtypes_t:
            run["configs"].append(run_config(n, dtype, args, batches, x_sample, x_eval, auxk=False))
            save(key, run)
            if args.auxk:
                run["configs"].append(run_config(n, dtype, args, batches, x_sample, x_eval, auxk=True))
                save(key, run)
    run["elapsed_s"] = time.time() - started
    results = save(key, run)
    print(markdown(results))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
