"""The Lorsa training objective against hand-computed losses, its parameter spec, the shared trainer's bit-exact resume
with it, and saving/loading a Lorsa."""

from __future__ import annotations

import json

import pytest
import torch

from ranklens.data.sequences import LorsaBatch
from ranklens.dictionaries.lorsa import Lorsa, LorsaConfig
from ranklens.dictionaries.lorsa_init import init_default_
from ranklens.dictionaries.lorsa_io import load_lorsa, save_lorsa
from ranklens.errors import RanklensError
from ranklens.lm.attention import RopeSpec
from ranklens.train.lorsa_objective import LorsaObjective
from ranklens.train.trainer import StepContext, Trainer, TrainSettings

D, H, G, DQK, K = 16, 32, 4, 8, 3


def _rope() -> RopeSpec:
    return RopeSpec(inv_freq=1.0 / (10000 ** (torch.arange(0, DQK, 2, dtype=torch.float32) / DQK)))


def _lorsa(seed: int = 0, dtype=torch.float64, **kw) -> Lorsa:
    cfg = dict(d_model=D, n_heads=H, n_qk_groups=G, d_qk=DQK, k=K, positions=_rope(), dtype=dtype)
    cfg.update(kw)
    lorsa = init_default_(Lorsa(LorsaConfig(**cfg)), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        lorsa.W_V.mul_(8.0)  # a scale at which heads fire
        lorsa.b_O.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return lorsa


def _batch(seed: int = 0, dtype=torch.float64) -> LorsaBatch:
    """3 right-padded sequences (lengths 9, 6, 4) with bos at position 0 excluded from the loss."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 6, 4])
    real = torch.arange(9)[None, :] < lengths[:, None]
    x = torch.randn(3, 9, D, generator=g, dtype=dtype) * real[..., None]
    y = (torch.randn(3, 9, D, generator=g, dtype=dtype) + 0.5) * real[..., None]
    stat = real.clone()
    stat[:, 0] = False
    return LorsaBatch(x, y, real, stat)


def _ctx(dead: torch.Tensor | None = None) -> StepContext:
    return StepContext(step=0, k=K, dead_mask=torch.zeros(H, dtype=torch.bool) if dead is None else dead)


def test_loss_is_the_fvu_over_ordinary_tokens():
    lorsa, batch = _lorsa(), _batch()
    result = LorsaObjective(lorsa).step_loss(batch, _ctx())
    out = lorsa(batch.x, batch.attention_mask)  # the explicit padding mask
    sel = batch.stat_mask
    y, y_hat = batch.target[sel], out.out[sel]
    expected = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    torch.testing.assert_close(result.loss, expected, rtol=1e-12, atol=0)
    assert result.n_tokens == int(sel.sum()) == 16
    fired = out.values[sel] > 0
    assert torch.equal(result.active, torch.unique(out.indices[sel][fired]))
    assert result.metrics["l0"] == pytest.approx(float(fired.sum()) / 16)
    result.loss.backward()
    assert lorsa.W_V.grad.abs().sum() > 0


def test_auxk_term_by_hand():
    lorsa, batch = _lorsa(), _batch()
    dead = torch.zeros(H, dtype=torch.bool)
    dead[::3] = True
    k_aux = 4
    result = LorsaObjective(lorsa, aux_k=k_aux, aux_coefficient=0.25).step_loss(batch, _ctx(dead))
    sel = batch.stat_mask
    out = lorsa(batch.x, batch.attention_mask)
    y, y_hat = batch.target[sel], out.out[sel]
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    # AuxK by hand: per token, the k_aux dead heads with the largest pre-ReLU z, ReLU'd, decoded through W_O.
    z = lorsa.z_pre(batch.x, batch.attention_mask)[sel]  # [16, H]
    e = (y - y_hat).detach()
    e_hat = torch.zeros_like(e)
    used = set()
    dead_idx = dead.nonzero().squeeze(1)
    for t in range(z.shape[0]):
        vals, pos = z[t, dead_idx].topk(k_aux)
        for v, p in zip(vals, pos, strict=True):
            if v > 0:
                e_hat[t] += v * lorsa.W_O[dead_idx[p]]
                used.add(int(dead_idx[p]))
    aux = ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    torch.testing.assert_close(result.loss, fvu + 0.25 * aux, rtol=1e-10, atol=0)
    main = set(torch.unique(out.indices[sel][out.values[sel] > 0]).tolist())
    assert set(result.active.tolist()) == main | used and used


def test_causal_objective_matches_the_masked_forward_and_encoders_keep_the_mask():
    """The objective drops the padding mask of a causal Lorsa (exact at the loss positions); a bidirectional one
    must keep it."""
    for causal in (True, False):
        lorsa, batch = _lorsa(causal=causal), _batch()
        loss = LorsaObjective(lorsa).step_loss(batch, _ctx()).loss
        sel = batch.stat_mask
        out = lorsa(batch.x, batch.attention_mask).out[sel]
        y = batch.target[sel]
        torch.testing.assert_close(loss, ((y - out) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), rtol=1e-12, atol=0)


def test_param_spec_and_frozen_qk_and_normalization():
    lorsa = _lorsa()
    spec = {id(p): flag for p, flag in LorsaObjective(lorsa).param_spec()}
    assert spec[id(lorsa.W_V)] and spec[id(lorsa.W_O)] and spec[id(lorsa.b_V)]
    assert not spec[id(lorsa.W_Q)] and not spec[id(lorsa.b_O)]
    lorsa.W_Q.requires_grad_(False)
    assert id(lorsa.W_Q) not in {id(p) for p, _ in LorsaObjective(lorsa).param_spec()}
    batch = _batch()
    before = lorsa(batch.x).out
    LorsaObjective(lorsa, normalize_output=True).after_step()
    torch.testing.assert_close(lorsa.W_O.norm(dim=1), torch.ones(H, dtype=torch.float64))
    torch.testing.assert_close(lorsa(batch.x).out, before, rtol=1e-10, atol=1e-10)


def _source():
    def batches(start: int):
        step = start
        while True:
            yield _batch(seed=1000 + step, dtype=torch.float32)
            step += 1

    return batches


def _trainer(path, optimizer: str, aux_k: int) -> Trainer:
    lorsa = _lorsa(seed=5, dtype=torch.float32)
    settings = TrainSettings(total_steps=24, lr=3e-3, optimizer=optimizer, warmup_steps=3, k=K,
                             dead_window_tokens=40, checkpoint_every=5, log_every=4)
    return Trainer(LorsaObjective(lorsa, aux_k=aux_k, normalize_output=aux_k > 0), settings, path, progress=False)


@pytest.mark.parametrize("optimizer, aux_k", [("adam", 0), ("sparseadam", 6)])
def test_resume_is_bit_exact(tmp_path, optimizer, aux_k):
    straight = _trainer(tmp_path / "a", optimizer, aux_k)
    straight.train(_source())
    interrupted = _trainer(tmp_path / "b", optimizer, aux_k)
    original, calls = interrupted._one_step, {"n": 0}

    def dies_after_13(batch):
        if calls["n"] == 13:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(batch)

    interrupted._one_step = dies_after_13
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(_source())
    resumed = _trainer(tmp_path / "b", optimizer, aux_k)
    resumed.train(_source())
    for (name, a), b in zip(straight.objective.lorsa.state_dict().items(),
                            resumed.objective.lorsa.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 8, 12, 16, 20, 24]
    assert any("aux_loss" in x for x in lines) == (aux_k > 0)  # AuxK took part in the run that resumed


def test_training_lowers_the_loss(tmp_path):
    trainer = _trainer(tmp_path, "adam", 0)
    trainer.train(_source())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < rows[0]["fvu"]


@pytest.mark.parametrize("extra", [{}, {"qk_norm": True, "use_value_bias": False, "causal": False}])
def test_save_and_load_reproduce_the_lorsa(tmp_path, extra):
    lorsa = _lorsa(seed=3, **extra)
    save_lorsa(lorsa, tmp_path / "l", model="m", layer=2)
    back, meta = load_lorsa(tmp_path / "l")
    assert meta == {"model": "m", "layer": 2}
    assert back.cfg.to_dict() == lorsa.cfg.to_dict()
    batch = _batch()
    assert torch.equal(back(batch.x, batch.attention_mask).out, lorsa(batch.x, batch.attention_mask).out)
    with pytest.raises(RanklensError, match="holds no Lorsa"):
        load_lorsa(tmp_path)
