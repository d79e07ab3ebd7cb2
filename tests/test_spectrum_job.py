"""The spectrum job end to end on a tiny local Llama: numbers against a dense recomputation, resume, reuse."""

import json

import pytest
import torch

from ranklens.data.corpus import iter_documents
from ranklens.data.tokenize import token_batches
from ranklens.errors import RanklensError
from ranklens.linalg.basis import effective_rank
from ranklens.lm.capture import Capturer
from ranklens.lm.load import load_model
from ranklens.spectrum.job import SpectrumConfig, run_spectrum


def _config(tiny_dir, **overrides) -> SpectrumConfig:
    values = dict(model=str(tiny_dir / "model"), corpus=str(tiny_dir / "corpus"), sites="L*.attn_out,L*.mlp_out,L1.attn_z",
                  tokens=1500, context_length=64, batch_tokens=512, dtype="float32", loss_recovered="L1.attn_out",
                  loss_tokens=300, loss_points=4, decompose="1", splits=2, gram_dtype="float64")  # the exact path
    values.update(overrides)
    return SpectrumConfig(**values)


def test_spectrum_matches_dense_recomputation(tiny_dir, tmp_path):
    cfg = _config(tiny_dir)
    result = run_spectrum(cfg, tmp_path / "run", progress=False, report=False)
    assert json.loads((tmp_path / "run" / "spectrum.json").read_text())["n_tokens"] == 1500

    # Dense reference: capture the same tokens, stack them, SVD.
    lm = load_model(cfg.model, "float32")
    capture = Capturer(lm.model, "L1.attn_out,L2.mlp_out")
    rows = {"L1.attn_out": [], "L2.mlp_out": []}
    for batch in token_batches(iter_documents(cfg.corpus, seed=0), lm.tokenizer, 64, 512):
        acts = capture(batch.input_ids, batch.attention_mask)
        for name in rows:
            rows[name].append(acts[name][batch.stat_mask])
    by_site = {r["site"]: r for r in result["records"]}
    for name, parts in rows.items():
        x = torch.cat(parts)[:1500].double()
        s = torch.linalg.svdvals(x - x.mean(0))
        rec = by_site[name]
        assert rec["n_tokens"] == 1500 and rec["d"] == 32
        torch.testing.assert_close(torch.tensor(rec["singular_values"], dtype=torch.float64), s, rtol=1e-6, atol=1e-6 * float(s[0]))
        assert rec["effective_rank"] == pytest.approx(effective_rank(s), rel=1e-9)
        assert rec["stability"]["n_splits"] == 2

    curve = by_site["L1.attn_out"]["loss_recovered"]
    assert curve["n"][0] == 0 and curve["n"][-1] == 32 and curve["fraction"][-1] == pytest.approx(1.0, abs=1e-4)
    if curve["n_99"] is not None:
        n99 = curve["n_99"]
        frac = dict(zip(curve["n"], curve["fraction"], strict=True))
        assert frac[n99] >= 0.99 and (n99 - 1 not in frac or frac[n99 - 1] < 0.99)
    dec = by_site["L1.attn_out"]["wo_decomposition"]
    f64 = {k: torch.tensor(v, dtype=torch.float64) for k, v in dec.items()}
    torch.testing.assert_close(f64["contrib_Z"] * f64["contrib_WO"], f64["var_O"], rtol=1e-9, atol=1e-12 * dec["var_O"][0])
    # O = Z W_O^T exactly in float32, so the Z-derived variance equals O's own eigenvalues.
    torch.testing.assert_close(f64["var_O"], f64["var_O_measured"], rtol=1e-4,
                               atol=1e-6 * dec["var_O_measured"][0])


def test_rerun_reuses_and_other_config_is_refused(tiny_dir, tmp_path):
    cfg = _config(tiny_dir, loss_recovered=None, decompose=None, splits=1)
    first = run_spectrum(cfg, tmp_path / "run", progress=False, report=False)
    again = run_spectrum(cfg, tmp_path / "run", progress=False, report=False)
    assert first == again
    with pytest.raises(RanklensError, match="holds another run"):
        run_spectrum(_config(tiny_dir, tokens=999), tmp_path / "run", progress=False, report=False)


def test_resume_from_checkpoint_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    """Kill the accumulation after its first checkpoint; the resumed run gives the same numbers."""
    import ranklens.spectrum.job as job

    cfg = _config(tiny_dir, loss_recovered=None, decompose=None, checkpoint_seconds=0.0)
    whole = run_spectrum(cfg, tmp_path / "whole", progress=False, report=False)

    calls = {"n": 0}
    original = job.AccumulationState.save

    def save_then_die(self, path):
        original(self, path)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(job.AccumulationState, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_spectrum(cfg, tmp_path / "resumed", progress=False, report=False)
    monkeypatch.setattr(job.AccumulationState, "save", original)
    resumed = run_spectrum(cfg, tmp_path / "resumed", progress=False, report=False)
    for a, b in zip(whole["records"], resumed["records"], strict=True):
        assert a["singular_values"] == b["singular_values"] and a["stability"] == b["stability"]


def test_bad_input(tiny_dir, tmp_path):
    with pytest.raises(RanklensError, match="not among --sites"):
        run_spectrum(_config(tiny_dir, loss_recovered="L2.attn_out,L0.resid_post"), tmp_path / "a", progress=False, report=False)
    with pytest.raises(RanklensError, match="--compare item"):
        run_spectrum(_config(tiny_dir, loss_recovered=None, compare="size=big"), tmp_path / "b", progress=False, report=False)
    with pytest.raises(RanklensError, match="exceeds the model's 128 positions"):
        run_spectrum(_config(tiny_dir, context_length=4096), tmp_path / "c", progress=False, report=False)


def test_compare_and_report(tiny_dir, minilm, tmp_path):
    """Comparisons run as sub-runs (a short-context model gets its context clamped) and land in one report."""
    from transformers import LlamaConfig, LlamaForCausalLM

    short = tmp_path / "short_model"
    cfg = LlamaConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(cfg).save_pretrained(short)
    minilm.tokenizer.save_pretrained(short)
    run_cfg = _config(tiny_dir, loss_recovered=None, decompose=None, splits=1, sites="L*.attn_out,L*.mlp_out",
                      compare=f"model={short},corpus=prose", compare_sites="Lmid.attn_out,Lmid.mlp_out",
                      compare_tokens=400)
    result = run_spectrum(run_cfg, tmp_path / "run", progress=False)
    labels = [c["label"] for c in result["compare"]]
    assert labels == [f"model={short}", "corpus=prose"]
    assert [r["site"] for r in result["compare"][0]["records"]] == ["L1.attn_out", "L1.mlp_out"]
    assert result["compare"][1]["records"][0]["n_tokens"] == 400
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "attention output" in html
