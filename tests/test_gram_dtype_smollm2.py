"""The spectrum job's default float32 Gram path against float64 on real activations of the embedded SmolLM2 (bf16,
as the job runs it): every statistic a report prints stays within the accuracy the README's Definitions state.
bench/gram_accuracy.py measures the same over all 120 sites and the loss-recovered curve."""

import pytest
import torch

from ranklens.data.corpus import iter_documents
from ranklens.data.tokenize import take_tokens, token_batches
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.lm.capture import Capturer
from ranklens.spectrum.stats import spectrum_summary

SITES = ["L0.attn_out", "L3.attn_out", "L15.attn_out", "L15.attn_z", "L15.mlp_out", "L15.resid_post"]


@pytest.fixture(scope="module")
def summaries(smollm2_bf16):
    lm = smollm2_bf16
    accs = {dtype: {s: CovarianceAccumulator(lm.model.config.hidden_size, gram_dtype=dtype) for s in SITES}
            for dtype in (torch.float64, torch.float32)}
    batches = token_batches(iter_documents("default", seed=0), lm.tokenizer, context_length=512, batch_tokens=4096)
    with Capturer(lm.model, ",".join(SITES)) as capture:
        for batch in take_tokens(batches, 8192):
            acts = capture(batch.input_ids, batch.attention_mask)
            for site, a in acts.items():
                rows = a[batch.stat_mask].float()
                for by_dtype in accs.values():
                    by_dtype[site].update(rows)
    return {dtype: {s: spectrum_summary(acc) for s, acc in by_site.items()} for dtype, by_site in accs.items()}


@pytest.mark.parametrize("site", SITES)
def test_float32_gram_meets_the_documented_accuracy(summaries, site):
    ref, fast = summaries[torch.float64][site], summaries[torch.float32][site]
    assert ref["n_tokens"] == fast["n_tokens"] >= 8000
    assert fast["effective_rank"] == pytest.approx(ref["effective_rank"], rel=2e-5)
    assert fast["frac_sv_above_1pct"] == ref["frac_sv_above_1pct"]
    assert max(abs(a - b) for a, b in zip(fast["cumulative_variance"], ref["cumulative_variance"], strict=False)) < 1e-7
    s, r = torch.tensor(fast["singular_values"]), torch.tensor(ref["singular_values"])
    above = r > 1e-2 * r[0]
    assert ((s[above] - r[above]).abs() / r[above]).max() < 3e-5
