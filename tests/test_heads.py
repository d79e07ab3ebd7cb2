"""Finding heads by function (Lorsa paper Section 5, App. E.1, F.3): path patching against a brute-force re-run of
the whole model, attribution against finite differences, pattern shares against the attention weights, and the
generated probes."""

import pytest
import torch
from tests.tiny_models import tiny_model

from ranklens.analysis.path_patching import LorsaLayer, row_metric, score_heads
from ranklens.analysis.probes import TASKS, Probe, ProbeBatch, make_probe
from ranklens.dictionaries.lorsa import Lorsa, LorsaConfig
from ranklens.errors import RanklensError
from ranklens.lm.attention import attention_probs, mhsa_weights
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel
from ranklens.lm.sites import Site, describe, per_head_outputs
from ranklens.lm.splice import replace_site

LAYER = 1


def _loaded(name: str = "llama") -> LoadedModel:
    model = tiny_model(name, dtype=torch.float64)
    return LoadedModel(model, None, name, torch.float64, describe(model))


def _probe(lm: LoadedModel, metric: str = "logit_diff", seed: int = 0) -> Probe:
    """Two batches of random sequences (lengths 9 and 7) with rows at several positions and random sources."""
    g = torch.Generator().manual_seed(seed)
    vocab = lm.model.config.vocab_size
    batches = []
    for N, T in ((5, 9), (3, 7)):
        ids = torch.randint(1, vocab, (N, T), generator=g)
        rows = torch.tensor([(i, p) for i in range(N) for p in (2, T - 1)])
        R = rows.shape[0]
        sources = torch.rand(R, T, generator=g) < 0.3
        foil = torch.randint(0, vocab, (R,), generator=g) if metric == "logit_diff" else None
        batches.append(ProbeBatch(ids, rows, torch.randint(0, vocab, (R,), generator=g), foil, sources))
    return Probe("test", "random", metric, 1, batches)


def _model_metric(lm: LoadedModel, probe: Probe, replacements: dict[int, list[torch.Tensor]]) -> torch.Tensor:
    """Full forward of every batch with `replacements[layer][batch]` as that layer's attention output; the metric
    at every row, in probe order."""
    out = []
    for i, batch in enumerate(probe.batches):
        everywhere = torch.ones(batch.input_ids.shape, dtype=torch.bool)
        with torch.no_grad():
            handles = [replace_site(lm.arch, Site(l, "attn_out"), lambda _, v=vals[i]: v.reshape(-1, v.shape[-1]), everywhere)
                       for l, vals in replacements.items()]
            for h in handles:
                h.__enter__()
            try:
                logits = lm.model(input_ids=batch.input_ids).logits
            finally:
                for h in reversed(handles):
                    h.__exit__(None, None, None)
        b, p = batch.rows[:, 0], batch.rows[:, 1]
        out.append(row_metric(logits[b, p], batch.target, batch.foil, probe.metric))
    return torch.cat(out)


@torch.no_grad()
def _captures(lm: LoadedModel, probe: Probe) -> list[dict[str, torch.Tensor]]:
    sites = [f"L{l}.attn_out" for l in range(lm.arch.n_layers)] + [f"L{LAYER}.attn_z", f"L{LAYER}.attn_in"]
    return [Capturer(lm.arch, sites)(b.input_ids) for b in probe.batches]


@torch.no_grad()
def _brute_force_mhsa(lm: LoadedModel, probe: Probe) -> torch.Tensor:
    """Each head of LAYER mean-ablated at every ordinary position (not position 0) by a full re-run, later attention
    outputs pinned to their clean values: the mean change of the metric over the rows."""
    caps = _captures(lm, probe)
    W_O = lm.arch.output_projection(LAYER)[0]
    H = lm.arch.n_heads
    heads = [per_head_outputs(c[f"L{LAYER}.attn_z"], W_O, H) for c in caps]  # [N, T, H, d]
    mean = torch.cat([h[:, 1:].reshape(-1, H, h.shape[-1]) for h in heads]).mean(0)  # [H, d]
    pinned = {l: [c[f"L{l}.attn_out"] for c in caps] for l in range(LAYER + 1, lm.arch.n_layers)}
    clean = _model_metric(lm, probe, pinned)
    effects = []
    for h in range(H):
        ablated_out = []
        for c, hd in zip(caps, heads, strict=True):
            delta = hd[:, :, h] - mean[h]
            delta[:, 0] = 0
            ablated_out.append(c[f"L{LAYER}.attn_out"] - delta)
        effects.append(float((clean - _model_metric(lm, probe, {LAYER: ablated_out, **pinned})).mean()))
    return torch.tensor(effects, dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_path_patching_equals_a_brute_force_rerun(family):
    lm = _loaded(family)
    probe = _probe(lm)
    run = score_heads(lm, probe, [LAYER])
    assert run.position_wise_error < 1e-10
    torch.testing.assert_close(run.mhsa[0].path_patching, _brute_force_mhsa(lm, probe), rtol=1e-9, atol=1e-11)
    assert run.mhsa[0].path_patching.abs().max() > 1e-4  # the heads do something here


def test_path_patching_at_layer_zero():
    lm = _loaded()
    probe = _probe(lm, "logprob")
    run = score_heads(lm, probe, [0])
    assert run.position_wise_error < 1e-10


def _random_lorsa(arch, *, k: int, n_heads: int = 32, std: float = 0.3, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Lorsa:
    """A Lorsa at layer LAYER of `arch` with Gaussian weights (4 QK groups)."""
    lorsa = Lorsa(LorsaConfig.from_mhsa(mhsa_weights(arch, LAYER), n_heads=n_heads, n_qk_groups=4, k=k, dtype=dtype))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorsa.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return lorsa


def _lorsa(lm: LoadedModel) -> Lorsa:
    return _random_lorsa(lm.arch, k=3, n_heads=16, std=0.5, seed=3, dtype=torch.float64)


def test_lorsa_path_patching_equals_a_brute_force_rerun():
    lm = _loaded()
    probe = _probe(lm)
    lorsa = _lorsa(lm)
    run = score_heads(lm, probe, [], [LorsaLayer(lorsa, LAYER)])
    with torch.no_grad():
        caps = _captures(lm, probe)
        pinned = {l: [c[f"L{l}.attn_out"] for c in caps] for l in range(LAYER + 1, lm.arch.n_layers)}
        clean = _model_metric(lm, probe, pinned)
        codes = [lorsa(c[f"L{LAYER}.attn_in"]) for c in caps]
        expected, active = [], []
        for h in range(lorsa.n_heads):
            ablated_out = []
            n_active = 0
            for c, code, batch in zip(caps, codes, probe.batches, strict=True):
                value = (code.values * (code.indices == h)).sum(-1)  # [N, T]
                value[:, 0] = 0
                ablated_out.append(c[f"L{LAYER}.attn_out"] - value[..., None] * lorsa.W_O[h])
                n_active += int((value[batch.rows[:, 0], batch.rows[:, 1]] > 0).sum())
            expected.append(float((clean - _model_metric(lm, probe, {LAYER: ablated_out, **pinned})).mean()))
            active.append(n_active)
        scores = run.lorsa[0]
        torch.testing.assert_close(scores.path_patching, torch.tensor(expected, dtype=torch.float64), rtol=1e-9,
                                   atol=1e-11)
        assert scores.active_rows.tolist() == active
        assert sum(active) > 0 and scores.path_patching.abs().max() > 1e-4


@torch.no_grad()
def _finite_difference(lm: LoadedModel, probe: Probe, deltas: list[torch.Tensor], eps: float = 1e-5) -> float:
    caps = _captures(lm, probe)
    base = [c[f"L{LAYER}.attn_out"] for c in caps]

    def mean_metric(sign: float) -> float:
        return float(_model_metric(lm, probe, {LAYER: [o + sign * eps * d for o, d in zip(base, deltas,
                                                                                         strict=True)]}).mean())

    return (mean_metric(1) - mean_metric(-1)) / (2 * eps)


def test_attribution_equals_finite_differences():
    lm = _loaded("gpt2")  # float64 throughout (Llama's RMSNorm computes in float32, too coarse for a difference)
    probe = _probe(lm)
    lorsa = _lorsa(lm)
    run = score_heads(lm, probe, [LAYER], [LorsaLayer(lorsa, LAYER)])
    with torch.no_grad():
        caps = _captures(lm, probe)
        H = lm.arch.n_heads
        heads = [per_head_outputs(c[f"L{LAYER}.attn_z"], lm.arch.output_projection(LAYER)[0], H) for c in caps]
        mean = torch.cat([h[:, 1:].reshape(-1, H, h.shape[-1]) for h in heads]).mean(0)
        for h in range(H):
            deltas = []
            for hd in heads:
                d = hd[:, :, h] - mean[h]
                d[:, 0] = 0
                deltas.append(d)
            assert run.mhsa[0].attribution[h] == pytest.approx(_finite_difference(lm, probe, deltas), rel=1e-6, abs=1e-9)
        codes = [lorsa(c[f"L{LAYER}.attn_in"]) for c in caps]
        checked = 0
        for h in run.lorsa[0].attribution.abs().argsort(descending=True)[:4].tolist():
            deltas = []
            for code in codes:
                value = (code.values * (code.indices == h)).sum(-1)
                value[:, 0] = 0
                deltas.append(value[..., None] * lorsa.W_O[h])
            assert run.lorsa[0].attribution[h] == pytest.approx(_finite_difference(lm, probe, deltas), rel=1e-6)
            checked += 1
        assert checked == 4


def test_pattern_share_is_the_attention_on_the_sources():
    lm = _loaded()
    probe = _probe(lm)
    run = score_heads(lm, probe, [LAYER])
    w = mhsa_weights(lm.arch, LAYER)
    shares = []
    for batch in probe.batches:
        x = Capturer(lm.arch, [f"L{LAYER}.attn_in"])(batch.input_ids)[f"L{LAYER}.attn_in"]
        a = attention_probs(w, x)  # [N, H, T, T]
        for (i, p), src in zip(batch.rows.tolist(), batch.sources, strict=True):
            shares.append(a[i, :, p][:, src].sum(-1))
    torch.testing.assert_close(run.mhsa[0].pattern_share, torch.stack(shares).mean(0))


def test_probes_are_generated_and_reproducible(smollm2):
    tok = smollm2.tokenizer
    for task in TASKS:
        probe = make_probe(task, tok, 6, seed=1)
        again = make_probe(task, tok, 6, seed=1)
        assert probe.n_sequences == 6 and probe.n_rows >= 6
        for a, b in zip(probe.batches, again.batches, strict=True):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.rows, b.rows)
            assert torch.equal(a.target, b.target) and torch.equal(a.sources, b.sources)
            assert bool((a.sources.sum(-1) >= 1).all())
            for (_, pos), src in zip(a.rows.tolist(), a.sources, strict=True):
                assert src.nonzero().max() <= pos  # causal: a source is never after the scored position
    other = make_probe("induction", tok, 6, seed=2)
    assert not torch.equal(other.batches[0].input_ids, make_probe("induction", tok, 6, seed=1).batches[0].input_ids)


def test_probe_contents(smollm2):
    tok = smollm2.tokenizer
    ind = make_probe("induction", tok, 3, seed=0).batches[0]
    ids = ind.input_ids[0].tolist()
    body = ids[1:]
    assert body[:16] == body[16:]  # the sequence repeats
    for (i, p), t, src in zip(ind.rows.tolist(), ind.target.tolist(), ind.sources, strict=True):
        assert t == ind.input_ids[i, p + 1]  # the next token
        (s,) = src.nonzero()[:, 0].tolist()
        assert ind.input_ids[i, s] == t  # the token after the earlier occurrence is the answer
    succ = make_probe("successor", tok, 4, seed=0).batches[0]
    for i in range(4):
        text = tok.decode(succ.input_ids[i])
        answer = tok.decode([succ.target[i]]).strip()
        items = [w.strip() for w in text.split(">")[-1].split(",") if w.strip()]
        for words in (["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],):
            if items[0] in words:
                assert words.index(answer) == words.index(items[-1]) + 1
    ioi = make_probe("copy_suppression", tok, 4, seed=0)
    for batch in ioi.batches:
        assert bool((batch.rows[:, 1] == batch.input_ids.shape[1] - 1).all())
        io = batch.input_ids[batch.rows[:, 0], batch.sources.long().argmax(-1)]
        assert torch.equal(io, batch.target)  # the source is the indirect object, the answer
        assert not torch.equal(batch.target, batch.foil)
    arith = make_probe("arithmetic", tok, 4, seed=0).batches[0]
    for i in range(4):
        text = tok.decode(arith.input_ids[i][1:])
        op1, op2 = (int(s) for s in text.replace("=", "").split("+"))
        assert str(op1 + op2).startswith(tok.decode([arith.target[i]]).strip())


def test_probe_errors(smollm2):
    with pytest.raises(RanklensError, match="unknown task"):
        make_probe("nope", smollm2.tokenizer, 4)
    with pytest.raises(RanklensError, match="at least one"):
        make_probe("induction", smollm2.tokenizer, 0)


def test_task_names_agree():
    from ranklens.analysis.config import HEAD_TASKS

    assert HEAD_TASKS == TASKS


def test_heads_command_on_a_local_model(tiny_dir, tmp_path, capsys):
    """`ranklens heads` end to end on a local model directory with a saved Lorsa: every MHSA head of the layers asked
    is scored, the position-wise forward reproduces the model, the Lorsa's heads are ranked with z patterns."""
    import json

    from ranklens.cli import main
    from ranklens.dictionaries.lorsa_io import save_lorsa
    from ranklens.lm.load import load_model

    lm = load_model(str(tiny_dir / "model"), "float32")
    lorsa = _random_lorsa(lm.arch, k=16)
    save_lorsa(lorsa, tmp_path / "lorsa", model=str(tiny_dir / "model"), layer=1)
    from ranklens.dictionaries.sae import SparseAutoencoder
    from ranklens.dictionaries.saelens import save_saelens

    for name in ("attn_in", "attn_out"):
        sae = SparseAutoencoder(d_in=lm.arch.d_model, n_features=64, k=4, generator=torch.Generator().manual_seed(5))
        save_saelens(sae, tmp_path / name, model=str(tiny_dir / "model"), site=f"L1.{name}", context_length=64,
                     corpus="tiny")
    out = tmp_path / "heads"
    assert main(["heads", "--model", str(tiny_dir / "model"), "--tasks", "induction,successor,attention_sink,"
                 "arithmetic", "--layers", "1-2", "--prompts", "24", "--corpus", str(tiny_dir / "corpus"), "--lorsa",
                 str(tmp_path / "lorsa"), "--threshold", "0", "--share", "0", "--operand-heads", "2",
                 "--broadcast-sequences", "6", "--input-sae", str(tmp_path / "attn_in"), "--output-sae",
                 str(tmp_path / "attn_out"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "induction" in printed and "Lorsa L1" in printed
    result = json.loads((out / "heads.json").read_text())
    assert result["layers"] == [1, 2]
    for task in ("induction", "successor", "attention_sink"):
        r = result["tasks"][task]
        assert r["position_wise_error"] < 1e-4
        assert 0 <= r["accuracy"] <= 1
        assert sorted((h["layer"], h["head"]) for h in r["mhsa"]) == [(l, h) for l in (1, 2) for h in range(4)]
        (lo,) = r["lorsa"]
        assert lo["layer"] == 1 and lo["heads_active"] > 0
        for row in lo["top"]:
            assert row["active_rows"] >= 10
        for pattern in lo["z_patterns"]:
            assert len(pattern["pattern"]) == len(pattern["token_ids"])
        for row in lo["top"][:3]:  # App. G for the heads shown
            features = row["features"]
            assert set(features) == {"q", "k", "v", "o"}
            assert len(features["v"]) == 5 and all(-1 <= f["cos"] <= 1 for f in features["v"] + features["o"])
            assert all(f["kl"] >= 0 for f in features["q"] + features["k"])
    assert result["tasks"]["induction"]["rows"] == 24 * 15
    page = (out / "heads.html").read_text()  # the view: tables, Table 6, z patterns, operand plots, broadcast
    assert "cf. App. F.3, Table 6" in page and "z pattern of Lorsa head" in page and "Operand plots" in page
    assert page.count('<img src="data:image/png;base64,') >= 4 and "src=\"http" not in page
    operands = result["tasks"]["arithmetic"]["lorsa"][0]["operands"]
    assert len(operands["heads"]) == min(2, len(result["tasks"]["arithmetic"]["lorsa"][0]["top"]))
    assert (out / operands["figure"]).stat().st_size > 1000
    (broadcast,) = result["broadcast"]
    assert broadcast["layer"] == 1 and broadcast["sequences"] == 6
    for head in broadcast["top"]:
        assert 0 <= head["broadcast"] <= 1 and head["sequences"] >= 5


def test_heads_command_errors(tmp_path, capsys):
    from ranklens.cli import main

    assert main(["heads", "--tasks", "induction,telepathy", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task(s) telepathy" in capsys.readouterr().err
    assert main(["heads", "--model", "minilm-l6", "--tasks", "induction", "--out", str(tmp_path / "y")]) == 2
    assert "not a causal LM" in capsys.readouterr().err
    assert main(["heads", "--input-sae", str(tmp_path), "--tasks", "induction", "--out", str(tmp_path / "z")]) == 2
    assert "exactly one --lorsa" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "xyz")


def test_operand_heuristics_of_known_grids():
    from ranklens.analysis.operands import operand_heuristic

    v = torch.arange(100)
    ranged = ((v >= 27) & (v <= 43)).double()[:, None].expand(100, 100)  # op1 in 27-43, whatever op2
    h = operand_heuristic(ranged)
    assert (h["operand"], h["kind"], h["description"]) == ("op1", "range", "op1 in 27-43")
    assert h["op1_share"] == pytest.approx(1) and h["op2_share"] == pytest.approx(0)
    digit = torch.isin(v % 10, torch.tensor([4, 5, 6])).double()[None, :].expand(100, 100) * 2.5  # op2 % 10
    h = operand_heuristic(digit + 0.01 * torch.rand(100, 100, generator=torch.Generator().manual_seed(0)))
    assert (h["operand"], h["kind"], h["description"]) == ("op2", "last digit", "op2 % 10 in [4, 5, 6]")
    assert h["op2_share"] > 0.99 and h["r2_units"] > 0.99
    two = (((v >= 30) & (v <= 39)) | ((v >= 70) & (v <= 79))).double()[None, :].expand(100, 100)
    assert operand_heuristic(two)["description"] == "op2 in 30-39, 70-79"  # every band, in order
    both = ranged * digit
    h = operand_heuristic(both)
    assert h["interaction_share"] > 0.3
    assert operand_heuristic(torch.zeros(100, 100))["description"] == "constant on the grid"


def test_operand_grid_equals_the_head_activation_of_each_prompt(tiny_dir, tmp_path):
    from ranklens.analysis.lorsa_interp import z_pattern_of_ids
    from ranklens.analysis.operands import operand_figure, operand_grid
    from ranklens.analysis.probes import ProbeTokenizer, arithmetic_tokens
    from ranklens.lm.load import load_model

    lm = load_model(str(tiny_dir / "model"), "float32")
    lorsa = _random_lorsa(lm.arch, k=4)
    grid = operand_grid(lm, lorsa, 1, [0, 5, 9], n=12)
    tok = ProbeTokenizer(lm.tokenizer)
    for op1, op2 in [(0, 0), (3, 11), (11, 7), (10, 10)]:
        ids = arithmetic_tokens(tok, op1, op2)
        for i, head in enumerate([0, 5, 9]):
            expected = z_pattern_of_ids(lorsa, lm, 1, ids, head)["activation"][-1]
            assert grid[i, op1, op2].item() == pytest.approx(expected, abs=1e-5)
    assert grid.abs().sum() > 0
    path = operand_figure(grid.float(), ["a", "b", "c"], tmp_path / "ops.png")
    assert path.stat().st_size > 1000


@torch.no_grad()
def _naive_broadcast(lorsa: Lorsa, x: torch.Tensor, prefix: int, gap: int, min_queries: int) -> torch.Tensor:
    out = lorsa(x[None])
    B = torch.zeros(lorsa.n_heads, dtype=torch.float64)
    T = x.shape[0]
    for h in range(lorsa.n_heads):
        Q = [i for i in range(prefix, T) if bool(((out.indices[0, i] == h) & (out.values[0, i] > 0)).any())]
        if len(Q) < min_queries:
            continue
        c = lorsa.z_pattern(x, h).abs().double()
        total = sum(float(c[i].sum()) for i in Q)
        best = max(sum(float(c[i, j]) for i in Q if i - j >= gap) for j in range(prefix, T))
        B[h] = best / total
    return B


def test_broadcast_score_equals_its_definition():
    from ranklens.analysis.broadcast import sequence_broadcast

    torch.manual_seed(0)
    cfg = LorsaConfig(d_model=8, n_heads=12, n_qk_groups=3, d_qk=4, k=5, dtype=torch.float64)
    lorsa = Lorsa(cfg)
    with torch.no_grad():
        for p in lorsa.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(15, 8, dtype=torch.float64)
    B, counted = sequence_broadcast(lorsa, x, prefix=1, gap=3, min_queries=2)
    torch.testing.assert_close(B, _naive_broadcast(lorsa, x, 1, 3, 2))
    assert counted.any() and (B > 0).any()


def test_a_head_reading_one_keyword_broadcasts():
    """Group 0 attends to position 5 from everywhere after it (a keyword), group 1 uniformly; all values 1."""
    from ranklens.analysis.broadcast import sequence_broadcast

    T, d, p, gap = 20, 4, 5, 4
    cfg = LorsaConfig(d_model=d, n_heads=2, n_qk_groups=2, d_qk=1, k=2, dtype=torch.float64)
    lorsa = Lorsa(cfg)
    x = torch.zeros(T, d, dtype=torch.float64)
    x[:, 1] = 1.0
    x[p, 0] = 1.0
    with torch.no_grad():
        lorsa.b_Q[0, 0] = 60.0  # q = 60, k_j = 60 x_j[0]: position p wins by e^3600 where visible
        lorsa.W_K[0, 0, 0] = 60.0
        lorsa.W_V[:, 1] = 1.0  # v_j = 1 for both heads
        lorsa.W_O[:, 2] = 1.0
    B, counted = sequence_broadcast(lorsa, x, prefix=1, gap=gap, min_queries=3)
    assert counted.all()
    # head 0: queries 1..p-1 attend uniformly to 0..i, queries >= p read p (mass 1 each); p is counted from p + gap on
    assert B[0].item() == pytest.approx((T - p - gap) / (T - 1), abs=1e-9)
    uniform = max(sum(1 / (i + 1) for i in range(j + gap, T)) for j in range(1, T)) / (T - 1)
    assert B[1].item() == pytest.approx(uniform, abs=1e-9)
    assert B[0] > 2 * B[1]


def _brute_force_kl(lorsa: Lorsa, x: torch.Tensor, head: int, i: int, delta: torch.Tensor, which: str) -> float:
    """KL between query i's attention before and after removing `delta` [T, d] from the input, recomputing only
    the query (which = "q") or only the keys ("k") from the ablated input."""
    g = lorsa.group_of(head)
    q, k = lorsa.qk_rows(x, g)
    q2, k2 = lorsa.qk_rows(x - delta, g)
    base = lorsa.query_probs(k @ q[i], i)
    new = lorsa.query_probs((k @ q2[i]) if which == "q" else (k2 @ q[i]), i)
    live = base > 0
    return float((base[live] * (base[live].log() - new[live].log())).sum())


@torch.no_grad()
def test_qk_impacts_equal_recomputing_from_the_ablated_input():
    from ranklens.analysis.lorsa_features import ov_alignment, qk_impacts
    from ranklens.dictionaries.sae import SparseAutoencoder

    lm = _loaded()
    lorsa = _lorsa(lm)  # RoPE of the tiny Llama, causal, float64
    sae = SparseAutoencoder(d_in=lm.arch.d_model, n_features=48, k=6, dtype="float64",
                            generator=torch.Generator().manual_seed(1))
    x = torch.randn(9, lm.arch.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    head, queries = 5, [3, 8]
    found = qk_impacts(lorsa, sae, x, head, queries)
    acts = sae.encode(x).to_dense()
    assert found["q"] and found["k"]
    for which in ("q", "k"):
        for f, kl in found[which].items():
            delta = acts[:, f, None] * sae.W_D[f]  # the feature's contribution at every position
            expected = max(_brute_force_kl(lorsa, x, head, i, delta, which) for i in queries
                           if which == "k" or acts[i, f] != 0)
            assert kl == pytest.approx(expected, rel=1e-8, abs=1e-12)
    # only features active at a query can move it; any feature active up to the last query can move a key
    assert set(found["q"]) == {f for i in queries for f in acts[i].nonzero()[:, 0].tolist()}
    assert set(found["k"]) == set(acts[: max(queries) + 1].abs().sum(0).nonzero()[:, 0].tolist())
    aligned = ov_alignment(lorsa, head, sae, sae, top=3)
    cos_v = torch.nn.functional.cosine_similarity(sae.W_D, lorsa.W_V[head][None], dim=1)
    assert [a["feature"] for a in aligned["v"]] == cos_v.abs().argsort(descending=True)[:3].tolist()
    assert aligned["o"][0]["cos"] == pytest.approx(float(torch.nn.functional.cosine_similarity(
        sae.W_E[aligned["o"][0]["feature"]], lorsa.W_O[head], dim=0)))
