"""The shared trainer with the SAE objective: bit-exact resume, the train-sae job end to end, errors."""

import json

import pytest
import torch

from ranklens.cli import main
from ranklens.dictionaries.sae import SAEConfig, SparseAutoencoder
from ranklens.errors import RanklensError
from ranklens.train.config import SAETrainConfig
from ranklens.train.sae_job import train_sae
from ranklens.train.sae_objective import SAEObjective
from ranklens.train.trainer import Trainer, TrainSettings


def _source(d: int, batch: int = 64):
    """Deterministic batches: batch i depends only on i, so a resumed run sees exactly the same data."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d**0.5

    def batches(start: int):
        step = start
        while True:
            g = torch.Generator().manual_seed(step)
            yield torch.randn(batch, d, generator=g) @ mix + 0.1
            step += 1

    return batches


def _trainer(tmp_path, optimizer: str, aux_k: int) -> Trainer:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, n_features=64, activation="topk", k=4))
    settings = TrainSettings(total_steps=30, lr=3e-3, optimizer=optimizer, warmup_steps=5, k=4,
                             dead_window_tokens=256, checkpoint_every=10, log_every=5)
    return Trainer(SAEObjective(sae, aux_k=aux_k), settings, tmp_path, progress=False)


@pytest.mark.parametrize("optimizer, aux_k", [("adam", 0), ("sparseadam", 8)])
def test_resume_is_bit_exact(tmp_path, optimizer, aux_k):
    straight = _trainer(tmp_path / "a", optimizer, aux_k)
    straight.train(_source(16))

    interrupted = _trainer(tmp_path / "b", optimizer, aux_k)
    original = interrupted._one_step
    calls = {"n": 0}

    def dies_after_14(batch):
        if calls["n"] == 14:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(batch)

    interrupted._one_step = dies_after_14
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(_source(16))
    resumed = _trainer(tmp_path / "b", optimizer, aux_k)  # a fresh process: everything from the checkpoint
    resumed.train(_source(16))
    assert resumed.step == straight.step == 30
    for (name, a), b in zip(straight.objective.sae.state_dict().items(), resumed.objective.sae.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(straight.tracker.tokens_since_fired, resumed.tracker.tokens_since_fired)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(5, 31, 5))  # each step logged once
    straight_lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["fvu"] for x in lines] == [x["fvu"] for x in straight_lines]


def test_training_reduces_fvu(tmp_path):
    trainer = _trainer(tmp_path, "adam", 0)
    trainer.train(_source(16))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < 0.8 * rows[0]["fvu"]
    assert {"step", "tokens", "lr", "k", "fvu", "l0", "dead", "dead_window_tokens"} <= set(rows[-1])


def _sae_cfg(tiny_dir, **overrides) -> SAETrainConfig:
    values = dict(model=str(tiny_dir / "model"), site="L1.attn_out", corpus=str(tiny_dir / "corpus"), tokens=4096,
                  batch_size=256, expansion=4, k=4, context_length=64, dtype="float32", eval_tokens=1000,
                  lm_eval_tokens=500, warmup_steps=4, lr=1e-3, init="asi", d_init=8, init_tokens=2000,
                  checkpoint_every=8, log_every=4, shuffle_buffer_tokens=2048)
    values.update(overrides)
    return SAETrainConfig(**values)


def test_train_sae_job_and_eval(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train_sae(_sae_cfg(tiny_dir), out, progress=False)
    expected = {"train_dead", "train_dead_fraction", "dead_window_tokens", "fvu", "nmse", "nmse_uncentered", "l0",
                "delta_lm_loss", "loss_recovered", "n_features", "k", "init", "d_init", "tokens", "ce_clean",
                "ce_spliced", "ce_zero_ablation", "explained_variance"}
    assert expected <= set(metrics)
    assert metrics["n_features"] == 128 and metrics["k"] == 4 and metrics["d_init"] == 8
    assert metrics["tokens"] == 4096 and 0 < metrics["fvu"] < 1 and 0 < metrics["l0"] <= 4
    assert (out / "sae" / "cfg.json").exists() and (out / "sae" / "sae_weights.safetensors").exists()
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert train_sae(_sae_cfg(tiny_dir), out, progress=False) == metrics  # reused, not retrained

    capsys.readouterr()
    assert main(["eval", "sae", str(out), "--eval-tokens", "1000", "--lm-eval-tokens", "500", "--dtype",
                 "float32"]) == 0
    printed = capsys.readouterr().out
    assert f"every metric: {out / 'eval.json'}" in printed  # a rounded table, then where the JSON is
    again = json.loads((out / "eval.json").read_text())
    assert again["fvu"] == pytest.approx(metrics["fvu"], rel=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"k": 1000}, "--k 1000"),
    ({"d_init": 99}, "--d-init 99"),
    ({"tokens": 10}, "less than one batch"),
])
def test_bad_combinations(tiny_dir, tmp_path, overrides, message):
    with pytest.raises(RanklensError, match=message):
        train_sae(_sae_cfg(tiny_dir, **overrides), tmp_path / "run", progress=False)


def test_stream_source_resumes_exactly(tiny_dir):
    """On the fly: batches from step s equal the tail of an uninterrupted stream, across chunk boundaries."""
    from ranklens.data.stream import StreamSource
    from ranklens.lm.load import load_model

    lm = load_model(str(tiny_dir / "model"), "float32")
    stream = StreamSource(lm, "L1.attn_out", str(tiny_dir / "corpus"), seed=3, context_length=64, batch_size=100,
                          chunk_tokens=350, forward_tokens=256)
    assert stream.batches_per_chunk == 3
    whole = [b for b, _ in zip(stream(0), range(8), strict=False)]
    for start in (1, 3, 5):
        tail = [b for b, _ in zip(stream(start), range(8 - start), strict=False)]
        assert all(torch.equal(a, b) for a, b in zip(whole[start:], tail, strict=True))
    assert len({tuple(b[0].tolist()) for b in whole}) == 8  # shuffled, no repeated rows at the batch starts


def test_train_sae_on_the_fly(tiny_dir, tmp_path):
    cfg = _sae_cfg(tiny_dir, source="stream", stream_chunk_tokens=1024, init="standard", tokens=2048)
    metrics = train_sae(cfg, tmp_path / "run", progress=False)
    assert metrics["source"] == "stream" and metrics["tokens"] == 2048 and 0 < metrics["fvu"] < 1.5
    assert not (tmp_path / "run" / "activations").exists()


def test_b_dec_init_mean_is_the_mean_of_the_init_tokens(tiny_dir):
    """--b-dec-init mean: b_D starts at the mean of the first init_tokens training activations (float64 sum)."""
    from ranklens.data.collect import CollectConfig, collect
    from ranklens.data.sources import StoreTokens
    from ranklens.lm.sites import Site
    from ranklens.train.sae_job import build_sae

    store = collect(CollectConfig(model=str(tiny_dir / "model"), sites="L1.attn_out", corpus=str(tiny_dir / "corpus"),
                                  tokens=3000, context_length=64, dtype="float32"), tiny_dir / "store-bdec",
                    progress=False)
    rows = torch.cat(list(store.iter_tokens("L1.attn_out"))).double()[:2000]
    for init in ("standard", "asi"):
        cfg = _sae_cfg(tiny_dir, b_dec_init="mean", init=init, init_tokens=2000)
        source = StoreTokens(store, Site(1, "attn_out"), batch_size=256, buffer_tokens=2048, seed=0, tokens=4096)
        sae, info = build_sae(cfg, 32, source)
        assert info["b_dec_init"] == "mean"
        torch.testing.assert_close(sae.b_D.detach().double(), rows.mean(0), rtol=0, atol=1e-6)
    sae, _ = build_sae(_sae_cfg(tiny_dir), 32, source)
    assert not sae.b_D.any()


def test_warmup_longer_than_its_share_is_clamped_with_a_warning(tiny_dir, tmp_path, capsys):
    from ranklens.train.schedules import MAX_WARMUP_SHARE, capped_warmup

    assert capped_warmup(500, 390) == (39, "warm-up of 500 steps is more than 10% of the 390-step run; using 39")
    assert capped_warmup(30, 390) == (30, None) and capped_warmup(5, 3)[0] == 1 and MAX_WARMUP_SHARE == 0.1
    train_sae(_sae_cfg(tiny_dir, warmup_steps=500), tmp_path / "run", progress=False)  # 16 steps
    assert "warm-up of 500 steps is more than 10% of the 16-step run; using 1" in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(1e-3)  # step 4 is past a 1-step warm-up


def test_curve_is_logged_at_the_asked_tokens_and_survives_resume(tiny_dir, tmp_path, monkeypatch):
    """curve.jsonl: held-out FVU and dead counts at the first step reaching each count, and at the end; a run
    killed after an evaluation and resumed from an earlier checkpoint logs each point once, with equal values."""
    from ranklens.train.sae_job import curve_steps

    assert curve_steps([1000, 2048, 10**9], 256, 16) == [4, 8, 16] and curve_steps([], 256, 16) == []
    cfg = _sae_cfg(tiny_dir, curve_tokens=[1000, 2048], checkpoint_every=6, dead_window_tokens=2000)
    whole = tmp_path / "whole"
    train_sae(cfg, whole, progress=False)
    curve = [json.loads(x) for x in (whole / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [4, 8, 16] and [r["tokens"] for r in curve] == [1024, 2048, 4096]
    assert all(0 < r["fvu"] < 2 and r["eval_tokens"] == 1000 for r in curve)
    assert curve[0]["train_dead"] is None and curve[-1]["train_dead"] is not None  # a window of 2,000 tokens
    assert curve[-1]["fvu"] == pytest.approx(json.loads((whole / "metrics.json").read_text())["fvu"], rel=1e-9)

    # A run killed during step 9 (after step 8's evaluation; the last checkpoint is step 6) and rerun.
    from ranklens.train.trainer import Trainer

    real_step = Trainer._one_step

    def dies_at_step_8(self, batch):
        if self.step == 8:
            raise KeyboardInterrupt
        return real_step(self, batch)

    part = tmp_path / "part"
    monkeypatch.setattr(Trainer, "_one_step", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_sae(cfg, part, progress=False)
    assert [json.loads(x)["step"] for x in (part / "curve.jsonl").read_text().splitlines()] == [4, 8]
    monkeypatch.setattr(Trainer, "_one_step", real_step)
    train_sae(cfg, part, progress=False)
    assert (part / "curve.jsonl").read_text() == (whole / "curve.jsonl").read_text()


@pytest.mark.parametrize("source", ["store", "stream"])
def test_a_group_member_equals_its_single_site_run(tiny_dir, tmp_path, source):
    """--sites trains every site (and seed) from one forward per batch; each member equals the single-site run of
    its own config.yaml (same seed and data order), weights bit for bit."""
    import yaml
    from safetensors.torch import load_file

    from ranklens.train.sae_group import GROUP_NAME

    cfg = _sae_cfg(tiny_dir, site="L15.attn_out", sites="L1.attn_out,L2.mlp_out", seeds=2, init="standard",
                   tokens=2048, source=source, stream_chunk_tokens=1024, curve_tokens=[1024])
    cfg = cfg.model_copy(update={"site": SAETrainConfig.model_fields["site"].default})
    group = train_sae(cfg, tmp_path / "group", progress=False)
    assert sorted(group["members"]) == ["L1.attn_out-s0", "L1.attn_out-s1", "L2.mlp_out-s0", "L2.mlp_out-s1"]
    assert json.loads((tmp_path / "group" / GROUP_NAME).read_text())["members"]["L2.mlp_out-s1"]["dir"] == \
        "L2.mlp_out-s1"
    member = tmp_path / "group" / "L2.mlp_out-s1"
    recorded = yaml.safe_load((member / "config.yaml").read_text())
    single_cfg = SAETrainConfig(**{k: v for k, v in recorded.items() if k != "job"})
    assert single_cfg.site == "L2.mlp_out" and single_cfg.seed == 1 and single_cfg.data_seed == 0
    alone = train_sae(single_cfg, tmp_path / "alone", progress=False)
    for name, value in alone.items():
        if name not in ("held_out",):
            assert group["members"]["L2.mlp_out-s1"][name] == value, name
    a, b = load_file(str(member / "sae" / "sae_weights.safetensors")), load_file(
        str(tmp_path / "alone" / "sae" / "sae_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (member / "curve.jsonl").read_text() == (tmp_path / "alone" / "curve.jsonl").read_text()
    # a rerun reuses every member
    assert train_sae(cfg, tmp_path / "group", progress=False) == group


def test_group_flags_are_checked_before_work(tiny_dir, tmp_path, capsys):
    with pytest.raises(RanklensError, match="--seeds, --k-values and --expansion-values need --sites"):
        SAETrainConfig.build({"seeds": 2})
    with pytest.raises(RanklensError, match="give --sites"):
        SAETrainConfig.build({"sites": "L*.attn_out", "site": "L3.attn_out"})
    code = main(["train", "sae", "--model", str(tiny_dir / "model"), "--sites", "L1.attn_out", "--site",
                 "L15.attn_out", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and "not both" in capsys.readouterr().err and not (tmp_path / "x").exists()
    for values, message in [({"sites": "L1.attn_out", "k_values": "4,8", "k": 16}, "give --k-values"),
                            ({"sites": "L1.attn_out", "expansion_values": "2,4", "expansion": 2},
                             "give --expansion-values"),
                            ({"sites": "L1.attn_out", "expansion_values": "2,4", "n_features": 64},
                             "give --expansion-values"),
                            ({"sites": "L1.attn_out", "shards": 2}, "--shards splits one SAE")]:
        with pytest.raises(RanklensError, match=message):
            SAETrainConfig.build(values)
    for flags in (["--k-values", "4,8", "--k", "50"], ["--expansion-values", "2,4", "--n-features", "64"]):
        code = main(["train", "sae", "--model", str(tiny_dir / "model"), "--sites", "L1.attn_out", *flags, "--out",
                     str(tmp_path / "x"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and "not both" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()


def test_a_group_of_one_site_on_the_fly(tiny_dir, tmp_path):
    """--sites with one site and --source stream (a one-site stream yields bare batches) equals the single run."""
    cfg = _sae_cfg(tiny_dir, site="L15.attn_out", sites="L1.attn_out", init="standard", tokens=1024,
                   source="stream", stream_chunk_tokens=1024)
    group = train_sae(cfg, tmp_path / "group", progress=False)["members"]["L1.attn_out"]
    alone = train_sae(cfg.model_copy(update={"site": "L1.attn_out", "sites": None, "data_seed": 0}),
                      tmp_path / "alone", progress=False)
    assert {k: v for k, v in group.items() if k != "held_out"} == {k: v for k, v in alone.items() if k != "held_out"}
