"""The notebook API: numbers equal the library's own computations, training stays in memory unless asked, and a run
directory is resumed only on request."""

import pytest
import torch

import ranklens
from ranklens.errors import RanklensError
from ranklens.linalg.basis import effective_rank as erank_of


def _low_rank(n=2000, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) @ torch.randn(6, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)


def test_effective_rank_and_spectrum_of_a_matrix_and_a_stream():
    x = _low_rank().double()
    s = torch.linalg.svdvals(x - x.mean(0))
    assert ranklens.effective_rank(x) == pytest.approx(erank_of(s), rel=1e-9)
    assert ranklens.effective_rank(iter(x.split(300))) == pytest.approx(ranklens.effective_rank(x), rel=1e-12)
    record = ranklens.spectrum(x)
    assert record["effective_rank"] == pytest.approx(erank_of(s), rel=1e-9) and record["d"] == 24
    with pytest.raises(RanklensError, match="no activations"):
        ranklens.effective_rank(iter([]))


def test_train_sae_in_memory_and_resume_only_when_asked(tmp_path):
    x = _low_rank().float()
    sae, metrics = ranklens.train_sae(x, eval_activations=x[:500], k=3, expansion=2, batch_size=200, epochs=2,
                                      lr=3e-3, seed=1)
    assert isinstance(sae, ranklens.SparseAutoencoder) and sae.n_features == 48
    assert len(metrics["history"]) > 0 and 0 < metrics["fvu"] < 1 and not list(tmp_path.iterdir())
    again, _ = ranklens.train_sae(x, k=3, expansion=2, batch_size=200, epochs=2, lr=3e-3, seed=1)
    assert torch.equal(again.W_D, sae.W_D)  # the same settings give the same SAE
    ranklens.train_sae(x, k=3, expansion=2, batch_size=200, epochs=1, run_dir=tmp_path / "run")
    with pytest.raises(RanklensError, match="holds a checkpoint; pass resume=True"):
        ranklens.train_sae(x, k=3, expansion=4, batch_size=200, run_dir=tmp_path / "run")
    with pytest.raises(RanklensError, match="does not fit this run"):  # another size: one line, not a size mismatch
        ranklens.train_sae(x, k=3, expansion=4, batch_size=200, run_dir=tmp_path / "run", resume=True)
    with pytest.raises(RanklensError, match="--k 0"):
        ranklens.train_sae(x, k=0)
