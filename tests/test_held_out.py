"""A shared held-out set gives every SAE run the metrics it gets alone, and refuses runs it does not fit."""

import pytest

from ranklens.data.collect import CollectConfig, collect
from ranklens.data.store import ActivationStore
from ranklens.errors import RanklensError
from ranklens.eval.held_out import HeldOutSet
from ranklens.lm.load import load_model
from ranklens.train.config import SAETrainConfig
from ranklens.train.sae_job import train_sae


def _cfg(tiny_dir, store, **overrides) -> SAETrainConfig:
    values = dict(model=str(tiny_dir / "model"), site="L1.attn_out", corpus=str(tiny_dir / "corpus"),
                  store=str(store), tokens=2048, batch_size=256, expansion=4, k=4, context_length=64,
                  dtype="float32", eval_tokens=700, lm_eval_tokens=300, warmup_steps=2, lr=1e-3,
                  checkpoint_every=100, log_every=4, shuffle_buffer_tokens=1024)
    values.update(overrides)
    return SAETrainConfig(**values)


def test_shared_held_out_set_equals_own(tiny_dir, tmp_path):
    lm = load_model(str(tiny_dir / "model"), "float32")
    store = tmp_path / "store"
    collect(CollectConfig(model=str(tiny_dir / "model"), sites="L1.attn_out,L2.mlp_out",
                          corpus=str(tiny_dir / "corpus"), tokens=3000, context_length=64, dtype="float32"),
            store, progress=False, lm=lm)
    cfg = _cfg(tiny_dir, store)
    shared = HeldOutSet(lm, ["L1.attn_out", "L2.mlp_out"], ActivationStore(store).held_out(), 700, 300)
    alone = train_sae(cfg, tmp_path / "alone", progress=False)
    together = train_sae(cfg, tmp_path / "together", progress=False, lm=lm, held_out=shared)
    assert together.keys() == alone.keys()
    for key, value in alone.items():
        assert together[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    other = train_sae(_cfg(tiny_dir, store, site="L2.mlp_out"), tmp_path / "mlp", progress=False, lm=lm,
                      held_out=shared)
    assert other["eval_tokens"] == 700 and other["lm_eval_tokens"] >= 300
    with pytest.raises(RanklensError, match="not this run's"):
        train_sae(_cfg(tiny_dir, store, eval_tokens=500), tmp_path / "bad", progress=False, lm=lm, held_out=shared)


def test_a_held_out_text_shorter_than_asked_is_said(tiny_dir, tmp_path, capsys):
    lm = load_model(str(tiny_dir / "model"), "float32")
    store = tmp_path / "store"
    collect(CollectConfig(model=str(tiny_dir / "model"), sites="L1.attn_out", corpus=str(tiny_dir / "corpus"),
                          tokens=3000, context_length=64, dtype="float32"), store, progress=False, lm=lm)
    source = ActivationStore(store).held_out()
    enough = HeldOutSet(lm, ["L1.attn_out"], source, 700, 0)
    assert enough.n_tokens == 700 and "warning" not in capsys.readouterr().err
    everything = HeldOutSet(lm, ["L1.attn_out"], source, 10**7, 0)
    n = sum(rows.shape[0] for rows in everything.activations("L1.attn_out"))
    assert 700 < everything.n_tokens == n < 10**7
    assert f"gives {n:,} of the 10,000,000 evaluation tokens" in capsys.readouterr().err
