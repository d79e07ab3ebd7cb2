"""`ranklens dashboard` on real runs of the tiny model: every number a page shows equals a brute-force computation
over the same held-out text (a fresh forward pass, the dictionary's dense code), in the data files and in a real
browser; the prompt analyzer of `ranklens serve` agrees with the same computation; bad input is one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dashboard_browser import WatchedPage, launch, read_payload
from ranklens.cli import main
from ranklens.dashboard.build import build_dashboard, compare_dashboards
from ranklens.dashboard.config import DashboardConfig, ServeConfig
from ranklens.dashboard.prompt import make_analyzer
from ranklens.dashboard.scan import _batches
from ranklens.data.corpus import HeldOutSource
from ranklens.data.sources import held_out_text
from ranklens.dictionaries.load import load_sae
from ranklens.dictionaries.lorsa_io import open_lorsa
from ranklens.errors import RanklensError
from ranklens.lm.capture import Capturer
from ranklens.lm.load import load_model
from ranklens.train.config import LorsaTrainConfig, SAETrainConfig
from ranklens.train.lorsa_job import train_lorsa
from ranklens.train.sae_job import train_sae
from test_dashboard_site import context_values, shown

TOKENS, N_TOP = 1500, 5
CFG = DashboardConfig(tokens=TOKENS, n_top=N_TOP, n_sample=30, before=4, after=2, dtype="float32")


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dash-runs")
    common = dict(model=str(tiny_dir / "model"), corpus=str(tiny_dir / "corpus"), context_length=64,
                  dtype="float32", eval_tokens=500, lm_eval_tokens=200, warmup_steps=1, lr=3e-3)
    for seed, init in ((0, "standard"), (1, "asi")):
        train_sae(SAETrainConfig(**common, site="L1.attn_out", tokens=4096, batch_size=256, expansion=4, k=4,
                                 init=init, d_init=8, init_tokens=2000, shuffle_buffer_tokens=1024, seed=seed),
                  root / f"sae-{init}", progress=False)
    train_lorsa(LorsaTrainConfig(**common, layer=1, heads=16, qk_groups=4, k=3, tokens=2048, batch_tokens=256,
                                 output_bias="mean", init_tokens=1000), root / "lorsa", progress=False)
    for name in ("sae-standard", "lorsa"):
        build_dashboard(root / name, CFG, root / name / "dashboard", progress=False)
    return root


def _records(site) -> dict[int, dict]:
    """Feature records of a written site, decoded like app.js does (contexts as dicts, tokens from the vocab)."""
    out = {}
    for path in sorted((site / "data").glob("features-*.js")):
        _, _, payload = read_payload(path)
        vocab = payload["vocab"]
        for rec in payload["features"]:
            def ctx(c, vocab=vocab):
                d = {"tokens": [None if t is None else vocab[t] for t in c[0]], "acts": c[1], "peak": c[2],
                     "doc": c[3], "pos": c[4]}
                if len(c) > 5:
                    d["z"] = c[5]
                return d
            rec["top"] = [ctx(c) for c in rec["top"]]
            for q in rec.get("quantiles", []):
                q["examples"] = [ctx(c) for c in q["examples"]]
            out[rec["id"]] = rec
    return out


@torch.no_grad()
def _brute_force(lm, text: HeldOutSource, site_name: str, encode):
    """(dense code per (sequence, position) of every ordinary token, ids per sequence) over the text the
    dashboard scanned, from a fresh forward pass."""
    capture = Capturer(lm.arch, [site_name])
    codes, ids, seq = {}, [], 0
    for batch, stat in _batches(lm, text, TOKENS):
        acts = capture(batch.input_ids, batch.attention_mask)[site_name]
        dense = encode(acts, batch.attention_mask)
        for b, length in enumerate(batch.lengths.tolist()):
            ids.append(batch.input_ids[b, :length].tolist())
            for p in range(length):
                if stat[b, p]:
                    codes[(seq, p)] = dense[b, p]
            seq += 1
    return codes, ids


def _check_contexts(rec, codes, ids, decode, f):
    for c in rec["top"]:
        seq, pos, peak = c["doc"], c["pos"], c["peak"]
        start = pos - peak
        assert c["tokens"] == [decode(i) for i in ids[seq][start:start + len(c["tokens"])]]
        want = [float(codes[(seq, start + j)][f]) if (seq, start + j) in codes else 0.0 for j in range(len(c["acts"]))]
        assert c["acts"] == pytest.approx(want, rel=2e-4, abs=1e-6)


@torch.no_grad()
def test_sae_pages_equal_brute_force(runs, tiny_dir):
    site = runs / "sae-standard" / "dashboard"
    _, _, manifest = read_payload(site / "data" / "meta.js")
    meta = manifest["meta"]
    sae = load_sae(runs / "sae-standard" / "sae")
    lm = load_model(str(tiny_dir / "model"), "float32")
    text = held_out_text(meta["held_out"], corpus=None, seed=1, context_length=None, default_corpus="",
                         default_context=64)

    def encode(acts, mask):
        return sae.encode(acts.reshape(-1, acts.shape[-1])).to_dense().reshape(*acts.shape[:2], -1)

    codes, ids = _brute_force(lm, text, "L1.attn_out", encode)
    dense = torch.stack(list(codes.values()))  # [tokens, F], in token order
    order = list(codes)
    assert meta["tokens"] == TOKENS == dense.shape[0] and meta["n_features"] == sae.n_features
    assert meta["n_dead"] == int(((dense > 0).sum(0) == 0).sum())
    records = _records(site)
    unit = sae.W_D / sae.W_D.norm(dim=1, keepdim=True)
    for f in range(sae.n_features):
        rec, col = records[f], dense[:, f]
        fired = col > 0
        assert rec["density"] == pytest.approx(float(fired.double().mean()), rel=1e-4)
        assert rec["alive"] == bool(fired.any())
        if not rec["alive"]:
            assert rec["top"] == []
            continue
        assert rec["max_act"] == pytest.approx(float(col.max()), rel=1e-4)
        assert rec["mean_act"] == pytest.approx(float(col[fired].mean()), rel=1e-4)
        ranked = sorted(range(len(order)), key=lambda i: (-float(col[i]), i))[:N_TOP]
        want = [order[i] for i in ranked if col[i] > 0]
        assert [(c["doc"], c["pos"]) for c in rec["top"]] == want
        _check_contexts(rec, codes, ids, lambda i: lm.tokenizer.decode([i]), f)
        cos = (unit @ unit[f])
        cos[f] = -2
        assert [n[0] for n in rec["neighbours"]] == cos.topk(CFG.neighbours).indices.tolist()
        effects = lm.model.get_output_embeddings().weight @ (lm.arch.final_norm.weight * sae.W_D[f])
        assert [t for t, _ in rec["logits"]["promoted"]] == [lm.tokenizer.decode([i]) for i in
                                                             effects.topk(CFG.logit_tokens).indices.tolist()]
        for interval in rec.get("quantiles", []):
            lo, hi = interval["range"]
            for c in interval["examples"]:
                assert lo * (1 - 1e-4) < c["acts"][c["peak"]] <= hi * (1 + 1e-4)
        assert 0.0 <= rec["subspace_share"] <= 1.0 + 1e-6
    # the random windows autointerp scores on: every active feature at every token, as the brute force has it
    windows = json.loads((site / "random_windows.json").read_text())["windows"]
    assert len(windows) == min(CFG.random_windows, TOKENS)
    for w in windows:
        assert len(w["codes"]) == len(w["tokens"]) and 0 <= w["peak"] < len(w["tokens"])
        start = w["pos"] - w["peak"]
        assert w["tokens"] == [lm.tokenizer.decode([i]) for i in ids[w["doc"]][start:start + len(w["tokens"])]]
        for j, code in enumerate(w["codes"]):
            key = (w["doc"], w["pos"] - w["peak"] + j)
            want = {f: float(v) for f, v in enumerate(codes[key].tolist()) if v > 0} if key in codes else {}
            assert {f for f, _ in code} == set(want)
            for f, v in code:
                assert v == pytest.approx(want[f], rel=1e-4, abs=1e-5)


@torch.no_grad()
def test_lorsa_pages_equal_brute_force(runs, tiny_dir):
    site = runs / "lorsa" / "dashboard"
    meta = read_payload(site / "data" / "meta.js")[2]["meta"]
    lorsa, _, _ = open_lorsa(runs / "lorsa")
    lm = load_model(str(tiny_dir / "model"), "float32")
    text = held_out_text(meta["held_out"], corpus=None, seed=1, context_length=None, default_corpus="",
                         default_context=64)

    def encode(acts, mask):
        out = lorsa(acts)
        return torch.zeros(*acts.shape[:2], lorsa.n_heads).scatter(-1, out.indices, out.values.float())

    codes, ids = _brute_force(lm, text, "L1.attn_in", encode)
    capture = Capturer(lm.arch, ["L1.attn_in"])
    records = _records(site)
    assert meta["kind"] == "lorsa" and meta["layer"] == 1
    for h in range(lorsa.n_heads):
        rec = records[h]
        assert rec["lorsa"]["qk_group"] == lorsa.group_of(h)
        _check_contexts(rec, codes, ids, lambda i: lm.tokenizer.decode([i]), h)
        for c in rec["top"]:
            seq_ids = torch.tensor([ids[c["doc"]]])
            pattern = lorsa.z_pattern(capture(seq_ids)["L1.attn_in"][0], h)[c["pos"]]
            start = c["pos"] - c["peak"]
            assert c["z"] == pytest.approx(pattern[start:start + len(c["z"])].tolist(), rel=2e-4, abs=1e-6)


@torch.no_grad()
def test_prompt_analyzer_equals_brute_force(runs, tiny_dir):
    site = runs / "sae-standard" / "dashboard"
    analyze = make_analyzer(site, ServeConfig(dtype="float32", top_features=3))
    out = analyze("The cat sat on the mat.")
    lm = load_model(str(tiny_dir / "model"), "float32")
    sae = load_sae(runs / "sae-standard" / "sae")
    ids = [lm.tokenizer.cls_token_id or lm.tokenizer.bos_token_id]
    body = lm.tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    assert len(out["tokens"]) == len(out["features"]) >= len(body)
    acts = Capturer(lm.arch, ["L1.attn_out"])(torch.tensor([[*out_ids(lm, body)]]))["L1.attn_out"][0]
    dense = sae.encode(acts).to_dense()
    for i, features in enumerate(out["features"][1:1 + len(body)], 1):  # the ordinary tokens
        top = dense[i].topk(3)
        want = [[int(f), float(v)] for v, f in zip(top.values, top.indices, strict=True) if v > 0]
        assert [f for f, _ in features] == [f for f, _ in want]
        assert [v for _, v in features] == pytest.approx([v for _, v in want], rel=1e-5)
    assert out["features"][0] == [] and out["features"][-1] == [] and ids  # [CLS] and [SEP] carry no features
    lorsa_out = make_analyzer(runs / "lorsa" / "dashboard", ServeConfig(dtype="float32"))("Mary gave John a drink.")
    head = next(hs[0] for hs in reversed(lorsa_out["heads"]) if hs)  # the last token with an active head
    assert len(head["z"]) == len(lorsa_out["tokens"]) and math.isfinite(head["act"])
    assert sum(head["z"]) == pytest.approx(head["act"], rel=1e-4, abs=1e-6)  # an active head: z = sum of sources


def out_ids(lm, body):
    from ranklens.data.tokenize import SpecialTokens

    special = SpecialTokens.from_tokenizer(lm.tokenizer)
    return [*special.prefix, *body, *special.suffix]


def test_compare_pairs_features_by_decoder_cosine(runs):
    out = runs / "compare"
    compare_dashboards(runs / "sae-standard", runs / "sae-asi", out, CFG, progress=False)
    data = read_payload(out / "data" / "compare.js")[2]
    a, b = load_sae(runs / "sae-standard" / "sae").W_D, load_sae(runs / "sae-asi" / "sae").W_D
    cos = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    best = cos.max(dim=1)
    assert [p[1] for p in data["pairs"]] == best.indices.tolist()
    assert [p[2] for p in data["pairs"]] == pytest.approx(best.values.tolist(), rel=1e-4, abs=1e-6)
    assert data["a"]["site_href"] == "../sae-standard/dashboard/" and (runs / "sae-asi" / "dashboard").is_dir()
    assert sum(data["a"]["subspace_histogram"]["counts"]) == a.shape[0]


def test_real_site_in_a_browser(runs):
    site = runs / "sae-standard" / "dashboard"
    records = _records(site)
    busiest = max(records, key=lambda f: records[f]["density"])
    pw, browser = launch()
    w = WatchedPage(browser)
    try:
        page = w.page
        page.goto((site / "index.html").as_uri() + f"#feature={busiest}")
        page.wait_for_selector("#top-contexts .ctx")
        got = context_values(page, "#top-contexts .ctx")
        want = records[busiest]["top"]
        assert [g["acts"] for g in got] == [c["acts"] for c in want]
        assert [g["tokens"] for g in got] == [[shown(t) for t in c["tokens"]] for c in want]
        assert [(g["doc"], g["pos"]) for g in got] == [(c["doc"], c["pos"]) for c in want]
        w.check()
    finally:
        w.close()
        browser.close()
        pw.stop()


def test_bad_input_is_one_line(runs, tiny_dir, tmp_path, capsys):
    def run(args):
        capsys.readouterr()
        code = main(args)
        return code, capsys.readouterr().err

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    code, err = run(["dashboard", str(not_a_run), "--out", str(tmp_path / "d"), "--quiet"])
    assert code == 2 and "is not a dictionary run" in err and err.count("\n") == 1
    code, err = run(["dashboard", str(runs / "sae-standard" / "sae"), "--model", str(tiny_dir / "model"), "--site",
                     "L1.mlp_hidden", "--out", str(tmp_path / "d"), "--quiet"])
    assert code == 2 and "has dimension 64 but the SAE expects d_in = 32" in err
    with pytest.raises(RanklensError, match="is not a directory"):
        build_dashboard(tmp_path / "missing", CFG, tmp_path / "d", progress=False)


def test_ranklens_serve_end_to_end(runs):
    """`ranklens serve DIR` as a user runs it (a process, the real model and SAE loaded once): the prompt API
    answers what the analyzer computes, a bad request is a 400 that leaves the server up, the prompt box works in
    Chromium, and Ctrl-C stops the server."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    site = runs / "sae-standard" / "dashboard"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen([sys.executable, "-m", "ranklens", "serve", str(site), "--port", str(port), "--dtype",
                             "float32", "--top-features", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def post(body: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(url + "api/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "ranklens serve did not start"
            try:
                with urllib.request.urlopen(url + "api/info", timeout=5) as resp:
                    assert resp.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        text = "The cat sat on the mat."
        status, got = post(json.dumps({"text": text}).encode())
        want = make_analyzer(site, ServeConfig(dtype="float32", top_features=3))(text)
        assert status == 200 and got["tokens"] == want["tokens"]
        assert [[f for f, _ in fs] for fs in got["features"]] == [[f for f, _ in fs] for fs in want["features"]]
        assert [v for fs in got["features"] for _, v in fs] == pytest.approx(
            [v for fs in want["features"] for _, v in fs], rel=1e-4)  # the server rounds to 5 digits
        for bad in (b'{"text": ""}', b"\xff\xfe", b"[1, 2]"):
            status, err = post(bad)
            assert status == 400 and err["error"], (bad, err)
        pw, browser = launch()
        w = WatchedPage(browser)
        try:
            page = w.page
            page.goto(url + "index.html")
            page.wait_for_selector("#prompt-form:not([hidden])")
            page.fill("#prompt-text", text)
            page.click("#prompt-submit")
            page.wait_for_function("!document.getElementById('prompt-submit').disabled && "
                                   "!document.getElementById('prompt-result').hasAttribute('aria-busy')")
            assert page.locator("#prompt-table tbody tr").count() == len(want["tokens"])
            w.check()
        finally:
            w.close()
            browser.close()
            pw.stop()
        assert proc.poll() is None  # every bad request left it serving
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode in (0, 130, -signal.SIGINT), proc.returncode


def test_a_run_given_another_model_is_one_line(runs, tmp_path, capsys):
    """A ranklens run with --model naming a model whose site has another width (MiniLM's 384 against the tiny
    model's 32): one line, no site written."""
    capsys.readouterr()
    code = main(["dashboard", str(runs / "sae-standard"), "--model", "minilm-l6", "--tokens", "200", "--out",
                 str(tmp_path / "d"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ranklens: error: ") and err.count("\n") == 1, err
    assert "has dimension 384 but the SAE expects" in err, err
    assert not (tmp_path / "d" / "index.html").exists()


def test_an_saelens_directory_with_model_and_site_builds_the_same_site(runs, tiny_dir, tmp_path, capsys):
    """The SAELens-format directory of a run, given --model and --site, builds the dashboard the run builds when
    both read the same text (--corpus from its start, cut at the same --context-length): the same densities, maxima and subspace shares."""
    common = ["--corpus", str(tiny_dir / "corpus"), "--context-length", "64", "--tokens", "600", "--n-top", "3",
              "--dtype", "float32", "--quiet"]
    assert main(["dashboard", str(runs / "sae-standard"), *common, "--out", str(tmp_path / "from-run")]) == 0
    assert main(["dashboard", str(runs / "sae-standard" / "sae"), "--model", str(tiny_dir / "model"), "--site",
                 "L1.attn_out", *common, "--out", str(tmp_path / "from-saelens")]) == 0
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("from-run", "from-saelens"))
    assert a["tokens"] == b["tokens"] == 600 and a["n_features"] == b["n_features"] == 128
    assert a["density"] == b["density"] and a["subspace_share"] == pytest.approx(b["subspace_share"], abs=1e-6)
    ra, rb = _records(tmp_path / "from-run"), _records(tmp_path / "from-saelens")
    assert [ra[f]["top"] for f in sorted(ra)] == [rb[f]["top"] for f in sorted(rb)]
