"""Throughput of `ranklens dashboard` against the bare forward plus encode over the same tokens, in the same run.

The reference is what any dashboard has to do: the capture forward to the SAE's site and the SAE's encode, over the
same held-out batches the build reads (``ranklens.dashboard.scan._batches``). Against it are timed the scan (the
reference plus the streaming per-feature statistics, top-N, samples, kept codes and the covariance of the site) and
the whole build after the model is loaded (scan, decoder geometry, logit effects, contexts, writing the site). The
variants alternate (A B C A B C ...) so drifting machine load hits all alike, and medians are reported; process CPU
time is recorded beside wall time (on a shared machine wall time swings with the other jobs' load). The goal is a
ratio of at least 0.8 for the scan. Usage:

    python bench/dashboard.py [--run DIR] [--tokens 20000] [--repeats 3] [--threads 1]

Without --run, a TopK SAE (8x, k = 32) is trained first on SmolLM2-135M's L15.attn_out (16,384 tokens) in a
temporary directory: its quality does not matter here, only its shape (4,608 features of d = 576).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

import ranklens.dashboard.build as build_module
from ranklens.dashboard.build import build_dashboard, open_dictionary, scan
from ranklens.dashboard.config import DashboardConfig
from ranklens.dashboard.scan import _batches
from ranklens.lm.capture import Capturer
from ranklens.train.config import SAETrainConfig
from ranklens.train.sae_job import train_sae


def _timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a `ranklens train sae` run directory (default: "
                                                               "train a small one first)")
    parser.add_argument("--tokens", type=int, default=20_000, help="held-out tokens scanned per variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "dashboard.json",
                        help="where the results JSON is written (also printed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "sae"
            train_sae(SAETrainConfig(model="smollm2-135m", site="L15.attn_out", tokens=16_384, batch_size=1024,
                                     expansion=8, k=32, eval_tokens=1024, lm_eval_tokens=0), run, progress=False)
        cfg = DashboardConfig(tokens=args.tokens)
        opened = open_dictionary(run, cfg)
        lm, sae, site = opened.lm, opened.dictionary, opened.site
        capture = Capturer(lm.arch, [site])

        @torch.no_grad()
        def reference() -> None:
            for batch, stat in _batches(lm, opened.text, args.tokens):
                acts = capture(batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device))[site.name]
                sae.encode(acts[stat.to(acts.device)].to(sae.W_D.dtype))

        def build() -> None:
            with mock.patch.object(build_module, "open_dictionary", lambda *a, **k: opened):
                build_dashboard(run, cfg, Path(tmp) / "site", progress=False)

        reference()  # warm-up
        variants = {"forward_encode": reference, "scan": lambda: scan(opened, cfg, progress=False),
                    "build_after_load": build}
        wall: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, variant in variants.items():
                w, c = _timed(variant)
                wall[name].append(w)
                cpu[name].append(c)
    ratios = {}
    for kind, times in (("wall", wall), ("cpu", cpu)):
        median = {name: statistics.median(t) for name, t in times.items()}
        for name in ("scan", "build_after_load"):
            ratios[f"{kind}_ratio_{name}_vs_forward_encode"] = median["forward_encode"] / median[name]
    text = json.dumps({
        "model": lm.name, "dtype": str(lm.dtype), "site": site.name, "n_features": sae.n_features, "d_in": sae.d_in,
        "tokens": args.tokens, "threads": torch.get_num_threads(), "load_average_after": os.getloadavg(), **ratios,
        "wall_seconds": wall, "cpu_seconds": cpu,
    }, indent=1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
