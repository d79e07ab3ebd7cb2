"""Throughput of the spectrum job against a bare truncated forward over the same tokens, in the same run.

The job runs its accumulation step (one early-stopped forward per batch feeding a covariance accumulator per site)
for every site of the demo (4 kinds x all layers), once with float64 and once with float32 Gram matrices; the
reference is `truncated_forward` (no hooks) through the same deepest layer over the same batches. The variants
alternate (A B C A B C ...) so drifting machine load hits all alike, and medians are reported. The goal is a
ratio of at least 0.8. Usage: python bench/spectrum.py [--tokens 8192] [--repeats 3] [--sites ...]
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()

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

    def reference() -> float:
        start = time.perf_counter()
        for b in batches:
            truncated_forward(lm.model, b.input_ids, b.attention_mask, last)
        return time.perf_counter() - start

    def job(gram_dtype: str) -> float:
        cfg = SpectrumConfig(**base, gram_dtype=gram_dtype)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            accumulate(lm, sites, set(), cfg, Path(tmp), progress=False)
            return time.perf_counter() - start

    reference()  # warm-up
    variants = {"truncated_forward": reference, "job_float64": lambda: job("float64"),
                "job_float32": lambda: job("float32")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            times[name].append(run())
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "model": args.model, "dtype": str(lm.dtype), "sites": len(sites), "tokens": args.tokens,
        "threads": torch.get_num_threads(), "seconds": times,
        "ratio_job_float64_vs_forward": median["truncated_forward"] / median["job_float64"],
        "ratio_job_float32_vs_forward": median["truncated_forward"] / median["job_float32"],
    }, indent=1))


if __name__ == "__main__":
    main()
