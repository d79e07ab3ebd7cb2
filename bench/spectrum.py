"""Throughput of the spectrum job against a bare truncated forward over the same tokens, in the same run.

The job runs its accumulation step (one early-stopped forward per batch feeding a covariance accumulator per site)
for every site of the demo (4 kinds x all layers), once with float64 and once with float32 Gram matrices; the
reference is `truncated_forward` (no hooks) through the same deepest layer over the same batches. The variants
alternate (A B C A B C ...) so drifting machine load hits all alike, and medians are reported. The goal is a
ratio of at least 0.8. Besides wall time, each variant's process CPU time is recorded: on a machine shared with other
jobs, wall time swings with their load while CPU time (best with --threads 1, where no thread spins waiting for a
descheduled sibling) stays close to the work done. Usage:
python bench/spectrum.py [--tokens 8192] [--repeats 3] [--threads N] [--sites ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ranklens.data.corpus import iter_documents
from ranklens.data.tokenize import token_batches
from ranklens.lm.capture import truncated_forward
from ranklens.lm.load import load_model
from ranklens.lm.sites import describe, parse_sites
from ranklens.spectrum.job import SpectrumConfig, accumulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sites", default="L*.attn_out,L*.attn_z,L*.mlp_out,L*.resid_post")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "spectrum.json",
                        help="where the results JSON is written (also printed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, "auto")
    arch = describe(lm.model)
    sites = parse_sites(args.sites, arch.n_layers)
    last = max(s.layer for s in sites)
    base = dict(model=args.model, sites=args.sites, tokens=args.tokens, batch_tokens=args.batch_tokens,
                checkpoint_seconds=1e9)
    batches = []
    for batch in token_batches(iter_documents("default", seed=0), lm.tokenizer, 1024, args.batch_tokens):
        batches.append(batch)
        if sum(b.n_tokens for b in batches) >= args.tokens:
            break

    def timed(run) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        return time.perf_counter() - wall, time.process_time() - cpu

    def reference() -> tuple[float, float]:
        def run() -> None:
            for b in batches:
                truncated_forward(lm.model, b.input_ids, b.attention_mask, last)
        return timed(run)

    def job(gram_dtype: str) -> tuple[float, float]:
        cfg = SpectrumConfig(**base, gram_dtype=gram_dtype)
        with tempfile.TemporaryDirectory() as tmp:
            return timed(lambda: accumulate(lm, sites, set(), cfg, Path(tmp), progress=False))

    reference()  # warm-up
    variants = {"truncated_forward": reference, "job_float64": lambda: job("float64"),
                "job_float32": lambda: job("float32")}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            w, c = run()
            wall[name].append(w)
            cpu[name].append(c)
    ratios = {}
    for kind, times in (("wall", wall), ("cpu", cpu)):
        median = {name: statistics.median(t) for name, t in times.items()}
        for name in ("job_float64", "job_float32"):
            ratios[f"{kind}_ratio_{name}_vs_forward"] = median["truncated_forward"] / median[name]
    text = json.dumps({
        "model": args.model, "dtype": str(lm.dtype), "sites": len(sites), "tokens": args.tokens,
        "threads": torch.get_num_threads(), "load_average_after": os.getloadavg(), **ratios,
        "wall_seconds": wall, "cpu_seconds": cpu,
    }, indent=1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
