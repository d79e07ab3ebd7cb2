"""`ranklens train lorsa` / `eval lorsa` / `zpattern` / `lorsa-top` end to end: on a tiny Llama (every init, store and
on-the-fly data, a killed run resumed bit-exactly, errors) and once on the embedded SmolLM2 through the CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from ranklens.analysis.lorsa_jobs import ZPatternConfig, run_zpattern
from ranklens.cli import main
from ranklens.dictionaries.lorsa_io import load_lorsa
from ranklens.errors import RanklensError
from ranklens.lm.capture import capture
from ranklens.lm.load import load_model
from ranklens.train.lorsa_job import LorsaTrainConfig, train_lorsa
from ranklens.train.trainer import Trainer

REQUIRED = {"fvu", "eval_dead", "eval_dead_fraction", "delta_lm_loss", "loss_recovered", "n_heads", "k", "init",
            "ce_clean", "ce_spliced", "ce_zero_ablation", "l0", "eval_tokens", "train_dead",
            "dead_window_tokens", "tokens"}


def _cfg(tiny_dir, **overrides) -> LorsaTrainConfig:
    values = dict(model=str(tiny_dir / "model"), corpus=str(tiny_dir / "corpus"), layer=1, heads=64, qk_groups=8, k=4,
                  tokens=3000, batch_tokens=400, context_length=48, dtype="float32", eval_tokens=800,
                  lm_eval_tokens=400, warmup_steps=2, lr=1e-3, init_tokens=1500, checkpoint_every=3, log_every=2)
    values.update(overrides)
    return LorsaTrainConfig(**values)


@pytest.mark.parametrize("init", ["default", "mhsa-qk", "asi"])
def test_train_lorsa_job_every_init(tiny_dir, tmp_path, init):
    out = tmp_path / "run"
    metrics = train_lorsa(_cfg(tiny_dir, init=init), out, progress=False)
    assert set(metrics) >= REQUIRED
    assert metrics["n_heads"] == 64 and metrics["k"] == 4 and metrics["init"] == init and metrics["layer"] == 1
    assert 0 < metrics["l0"] <= 4 and metrics["eval_tokens"] == 800 and 0 <= metrics["eval_dead_fraction"] <= 1
    assert metrics["d_init"] == (8 if init == "asi" else None)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    lorsa, meta = load_lorsa(out / "lorsa")
    torch.testing.assert_close(lorsa.W_O.norm(dim=1), torch.ones(64))  # footnote 3 applied before saving
    assert meta["layer"] == 1 and meta["init"] == init
    if init != "default":  # the copied Q/K of group 0 are MHSA head 0's before training moved them a little
        from ranklens.lm.attention import mhsa_weights

        w = mhsa_weights(load_model(str(tiny_dir / "model"), "float32").model, 1)
        assert (lorsa.W_Q[0] - w.W_Q[0]).abs().max() < 0.1
    assert train_lorsa(_cfg(tiny_dir, init=init), out, progress=False) == metrics  # reused, not retrained


def test_killed_run_resumes_bit_exactly(tiny_dir, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dir, init="asi", optimizer="sparseadam", aux_k=8, dead_window_tokens=400)
    straight = train_lorsa(cfg, tmp_path / "a", progress=False)
    original = Trainer._one_step
    calls = {"n": 0}

    def dies_after_4(self, batch):
        if calls["n"] == 4:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, batch)

    monkeypatch.setattr(Trainer, "_one_step", dies_after_4)
    with pytest.raises(KeyboardInterrupt):
        train_lorsa(cfg, tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "metrics.json").exists() and (tmp_path / "b" / "checkpoint.safetensors").exists()
    monkeypatch.setattr(Trainer, "_one_step", original)
    resumed = train_lorsa(cfg, tmp_path / "b", progress=False)
    a, b = load_file(tmp_path / "a" / "lorsa" / "lorsa.safetensors"), load_file(tmp_path / "b" / "lorsa" /
                                                                                "lorsa.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed == straight


def test_train_lorsa_on_the_fly(tiny_dir, tmp_path):
    metrics = train_lorsa(_cfg(tiny_dir, source="stream", tokens=1600), tmp_path / "run", progress=False)
    assert metrics["source"] == "stream" and 0 < metrics["tokens"] <= 1600 and metrics["fvu"] > 0
    assert not (tmp_path / "run" / "activations").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"heads": 2, "qk_groups": 2, "k": 2, "init": "asi"}, "fewer than the MHSA's 4 heads"),
    ({"d_qk": 4, "init": "mhsa-qk"}, "--d-qk 4 differs from the MHSA's d_head 8"),
    ({"heads": 60}, "not divisible by n_qk_groups 8"),
    ({"k": 65}, "k=65 exceeds n_heads=64"),
    ({"tokens": 100}, "less than one batch"),
    ({"layer": 3}, "--layer 3 is out of range"),
])
def test_bad_combinations(tiny_dir, tmp_path, overrides, message):
    with pytest.raises(RanklensError, match=message):
        train_lorsa(_cfg(tiny_dir, **overrides), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_zpattern_and_top_activations_on_a_run(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_lorsa(_cfg(tiny_dir, init="asi"), out, progress=False)
    text = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    record = run_zpattern(out, ZPatternConfig(head=5, text=text, dtype="float32"))
    T = len(record["tokens"])
    assert len(record["pattern"]) == T and len(record["pattern"][0]) == T
    lorsa, _ = load_lorsa(out / "lorsa")
    lm = load_model(str(tiny_dir / "model"), "float32")
    x = capture(lm.model, "L1.attn_in", torch.tensor([record["token_ids"]]))["L1.attn_in"]
    z = lorsa.z_pre(x)[0, :, 5]
    torch.testing.assert_close(torch.tensor(record["z"]), z, rtol=1e-5, atol=1e-5)
    assert all(record["pattern"][i][j] == 0 for i in range(T) for j in range(i + 1, T))  # causal
    code = lorsa(x)
    expected = ((code.indices[0] == 5) * code.values[0]).sum(-1)
    torch.testing.assert_close(torch.tensor(record["activation"]), expected, rtol=1e-5, atol=1e-6)

    capsys.readouterr()
    assert main(["lorsa-top", str(out), "--tokens", "500", "--dtype", "float32", "--n-top", "3"]) == 0
    top = json.loads((out / "interp" / "top_activations.json").read_text())
    attr = json.loads((out / "interp" / "attribution.json").read_text())
    assert top["tokens"] >= 500 and len(top["heads"]) == 64 and top["n_top"] == 3
    active = [h for h in top["heads"] if h["top"]]
    assert active and all(len(h["top"]) <= 3 for h in active)
    values = [e["value"] for e in active[0]["top"]]
    assert values == sorted(values, reverse=True)
    assert attr["n_mhsa_heads"] == 4 and attr["heads_with_activity"] == len(active)
    assert all(1 <= h["heads_for_90pct"] <= 4 or h["heads_for_90pct"] == 0 for h in attr["heads"])


def test_cli_end_to_end_on_smollm2(smollm2, tmp_path, capsys):
    """The embedded model through the CLI with tiny counts: train (ASI), eval, zpattern, and a bad input."""
    out = tmp_path / "run"
    args = ["train", "lorsa", "--model", "smollm2-135m", "--layer", "15", "--heads", "144", "--qk-groups", "9",
            "--k", "8", "--init", "asi", "--tokens", "1200", "--batch-tokens", "400", "--context-length", "64",
            "--dtype", "float32", "--eval-tokens", "300", "--lm-eval-tokens", "200", "--init-tokens", "800",
            "--warmup-steps", "1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= REQUIRED and metrics["n_heads"] == 144 and metrics["init"] == "asi"
    assert metrics["d_init"] == 64 and metrics["d_qk"] == 64 and metrics["n_qk_groups"] == 9
    capsys.readouterr()
    assert main(["eval", "lorsa", str(out), "--eval-tokens", "300", "--lm-eval-tokens", "200", "--dtype",
                 "float32"]) == 0
    printed = capsys.readouterr().out
    assert f"every metric: {out / 'eval.json'}" in printed  # a rounded table, then where the JSON is
    again = json.loads((out / "eval.json").read_text())
    assert again["fvu"] == pytest.approx(metrics["fvu"], rel=1e-5)
    assert again["eval_dead"] == metrics["eval_dead"]
    assert main(["zpattern", str(out), "--head", "7", "--text", "Hello world, hello world", "--dtype",
                 "float32"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["head"] == 7 and record["qk_group"] == 0 and record["tokens"][0] == "<|im_start|>"
    assert main([*args[:-3], "--heads", "145", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not divisible" in err[0]


def test_output_bias_mean_is_the_mean_target_of_the_first_init_tokens(tiny_dir, tmp_path):
    from ranklens.data.sources import lorsa_source
    from ranklens.lm.attention import mhsa_weights
    from ranklens.train.lorsa_job import build_lorsa

    cfg = _cfg(tiny_dir, output_bias="mean", init_tokens=700)
    lm = load_model(cfg.model, "float32")
    source = lorsa_source(lm, 1, kind="store", store=None, run_dir=tmp_path / "run", corpus=cfg.corpus, seed=cfg.seed,
                          context_length=cfg.context_length, tokens=cfg.tokens, batch_tokens=cfg.batch_tokens,
                          dtype="float32", device="cpu", progress=False)
    lorsa, info = build_lorsa(cfg, mhsa_weights(lm.arch, 1), source)
    rows = torch.cat([b.target[b.stat_mask] for b in itertools.islice(source(0), 3)])[:700].double()  # 3 x 400 > 700
    assert info["output_bias"] == "mean"
    torch.testing.assert_close(lorsa.b_O.double(), rows.mean(0), rtol=1e-6, atol=1e-6)
    zero, info = build_lorsa(_cfg(tiny_dir), mhsa_weights(lm.arch, 1), source)
    assert info["output_bias"] == "zero" and torch.equal(zero.b_O, torch.zeros_like(zero.b_O))  # App. O.2
