"""Capture throughput on the embedded SmolLM2, as ratios measured in the same run.

1. capture of every site of layers 0..L (one forward, early stop after layer L) against a bare forward truncated
   at layer L (no hooks): the goal is a ratio of at least 0.95;
2. capture of one site at layer L against the full forward (all 30 layers and the LM head): the early-stop speedup.

Runs alternate between the variants (A B A B ...) so drifting machine load hits all alike; the median of the
repeats is reported. Usage: python bench/capture.py [--layer 15] [--tokens 4096] [--repeats 7] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ranklens.data.corpus import iter_documents
from ranklens.data.tokenize import token_batches
from ranklens.lm.capture import Capturer, truncated_forward
from ranklens.lm.load import load_model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=4096, help="padded positions per forward")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    lm = load_model(args.model, args.dtype)
    batch = next(token_batches(iter_documents("default", seed=0), lm.tokenizer, context_length=1024,
                               batch_tokens=args.tokens))
    ids, mask = batch.input_ids, batch.attention_mask
    all_sites = Capturer(lm.model, f"L0-{args.layer}.*")
    one_site = Capturer(lm.model, f"L{args.layer}.attn_out")

    def full_forward():
        with torch.inference_mode():
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)

    variants = {
        "truncated_forward": lambda: truncated_forward(lm.model, ids, mask, args.layer),
        "capture_all_sites": lambda: all_sites(ids, mask),
        "capture_one_site": lambda: one_site(ids, mask),
        "full_forward": full_forward,
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    n_tokens = int(mask.sum())
    result = {
        "model": args.model, "dtype": str(lm.dtype), "layer": args.layer, "tokens_per_forward": n_tokens,
        "sites_captured": len(all_sites.sites), "threads": torch.get_num_threads(),
        "tokens_per_second": {name: n_tokens / t for name, t in median.items()},
        "ratio_capture_all_sites_vs_truncated_forward": median["truncated_forward"] / median["capture_all_sites"],
        "ratio_capture_one_site_vs_truncated_forward": median["truncated_forward"] / median["capture_one_site"],
        "early_stop_speedup_vs_full_forward": median["full_forward"] / median["capture_one_site"],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
