"""The capture forward with and without the padding mask, on right-padded batches of SmolLM2 (issue #18, item 1).

A causal model attends only backwards, so with right padding no counted position sees a pad: without the mask,
SDPA can take its causal path (`is_causal`) instead of a dense boolean mask. This checks that the activations at
every `stat_mask` position stay bit-identical (torch.equal) and times one full-depth forward both ways
(alternating, medians). A measurement for a change not made yet: ranklens still passes the mask.
Usage: python bench/forward_mask.py
"""

import statistics
import time

import torch

from ranklens.data.corpus import iter_documents
from ranklens.data.tokenize import token_batches
from ranklens.lm.capture import Capturer
from ranklens.lm.load import load_model
from ranklens.lm.sites import describe, parse_sites


def main() -> None:
    lm = load_model("smollm2-135m", "auto")
    arch = describe(lm.model)
    capture = Capturer(arch, parse_sites("L0.attn_out,L15.attn_out,L29.resid_post", arch.n_layers))
    batches = []
    for batch in token_batches(iter_documents("default", seed=0), lm.tokenizer, 1024, 8192):
        batches.append(batch)
        if len(batches) == 3:
            break
    for batch in batches:
        masked, unmasked = capture(batch.input_ids, batch.attention_mask), capture(batch.input_ids, None)
        counted = batch.stat_mask
        equal = {site: torch.equal(masked[site][counted], unmasked[site][counted]) for site in masked}
        print(tuple(batch.input_ids.shape), "pad positions", int((~batch.attention_mask.bool()).sum()), equal)
    times: dict[str, list[float]] = {"mask": [], "no mask": []}
    for _ in range(3):
        for key, mask in (("mask", batches[0].attention_mask), ("no mask", None)):
            start = time.perf_counter()
            capture(batches[0].input_ids, mask)
            times[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(values) for key, values in times.items()}
    print({key: round(value, 2) for key, value in medians.items()}, "ratio", round(medians["mask"] / medians["no mask"], 3))


if __name__ == "__main__":
    main()
