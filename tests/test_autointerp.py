"""autointerp without a judge: the numbers (against naive references), the prompts and their parsing, the cache, the
dashboard data it reads, and the client's one-line errors against real HTTP servers that refuse or are absent."""

from __future__ import annotations

import http.server
import json
import math
import socket
import threading

import numpy as np
import pytest

from autointerp_data import SENTENCES, activation, tokens_of, write_synthetic_site
from ranklens.autointerp import prompts
from ranklens.autointerp.cache import DiskCache, request_key
from ranklens.autointerp.client import Judge
from ranklens.autointerp.config import CompareConfig, JudgeConfig, ScoreConfig
from ranklens.autointerp.pipeline import random_explanations
from ranklens.autointerp.samples import feature_data
from ranklens.autointerp.scores import balanced_accuracy, correlation, simulation_score, summary, welch
from ranklens.dashboard.site_reader import (
    AUTOINTERP_DATA,
    attach_autointerp,
    read_index,
    read_manifest,
    read_random_windows,
    read_records,
    window_context,
)
from ranklens.errors import RanklensError

# --------------------------------------------------------------------------- simulation score: known answers


def test_perfect_prediction_correlates_one():
    rng = np.random.default_rng(0)
    true = rng.exponential(size=200) * (rng.random(200) < 0.2)
    assert correlation(true.tolist(), true.tolist()) == pytest.approx(1.0)
    # the judge's 0-10 scale is an affine map of the truth: still a perfect score
    assert correlation((10 * true / true.max()).tolist(), true.tolist()) == pytest.approx(1.0)
    assert correlation((-true).tolist(), true.tolist()) == pytest.approx(-1.0)


def test_shuffled_prediction_correlates_about_zero():
    rng = np.random.default_rng(1)
    true = rng.exponential(size=20_000) * (rng.random(20_000) < 0.3)
    shuffled = rng.permutation(true)
    assert abs(correlation(shuffled.tolist(), true.tolist())) < 0.03  # ~ 1/sqrt(n) = 0.007


def test_correlation_matches_numpy_and_is_undefined_for_constants():
    rng = np.random.default_rng(2)
    for _ in range(20):
        a, b = rng.normal(size=30), rng.normal(size=30)
        assert correlation(a.tolist(), b.tolist()) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert correlation([0, 0, 0], [1, 2, 3]) is None
    assert correlation([1.0], [2.0]) is None
    with pytest.raises(ValueError):
        correlation([1, 2], [1, 2, 3])


def test_simulation_score_pools_contexts_by_kind():
    true = [[0, 0, 5, 0], [0, 8, 0], [0, 0, 0], [0, 0, 0, 0]]
    kinds = ["top", "top", "random", "random"]
    perfect = simulation_score([[v * 2 for v in t] for t in true], true, kinds)
    assert perfect["top"] == pytest.approx(1.0) and perfect["all"] == pytest.approx(1.0)
    assert perfect["random"] is None  # the feature never fires there: undefined, not faked
    pooled = [v for t in true for v in t]
    pred = [[1, 0, 3, 0], [0, 2, 1], [0, 1, 0], [0, 0, 0, 2]]
    got = simulation_score(pred, true, kinds)
    assert got["all"] == pytest.approx(np.corrcoef([v for p in pred for v in p], pooled)[0, 1])
    assert simulation_score([[0] * len(t) for t in true], true, kinds)["all"] == 0.0  # constant: no information


def test_balanced_accuracy_and_summary_and_welch_against_naive():
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    assert balanced_accuracy([1, 1, 1, 1], [1, 1, 0, 0]) == 0.5  # always yes scores chance
    assert balanced_accuracy([None, 1, 0, None], [1, 1, 0, 0]) == 0.5  # unreadable counts as wrong
    assert balanced_accuracy([1, 1], [1, 1]) is None
    s = summary([1.0, 2.0, None, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "n": 3}
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.3, 1, 40), rng.normal(0.0, 2, 25)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    from scipy import stats

    got = welch(a.tolist(), b.tolist())
    assert got["t"] == pytest.approx(t) and got["df"] == pytest.approx(df)
    assert got["p"] == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert welch([1.0], [2.0, 3.0])["p"] is None


# --------------------------------------------------------------------------- prompts and parsing


def test_templates_fill_every_slot_and_keep_few_shot_turns():
    ctx = {"tokens": ["The", " cat", "\n", " sat"], "acts": [0, 4.0, 0, 1.0], "peak": 1, "z": [1, 3, 0, 0]}
    msgs = prompts.explain_activations([ctx], 4.0)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert " cat\t10" in msgs[-1]["content"] and "↵\t0" in msgs[-1]["content"] and " sat\t2" in msgs[-1]["content"]
    z = prompts.explain_zpattern([ctx])[-1]["content"]
    assert "The\t3" in z and " cat\t10\t**query**" in z and " sat" not in z  # tokens after the query are cut
    for build in (lambda: prompts.simulate_activations("animals", ctx), lambda: prompts.simulate_zpattern("x", ctx),
                  lambda: prompts.detect("x", [ctx]), lambda: prompts.fuzz("x", [ctx], [{1}]),
                  lambda: prompts.rubric([ctx])):
        assert all("{{" not in m["content"] for m in build())
    assert "The<< cat>>↵<< sat>>" in prompts.rubric([ctx])[-1]["content"]
    with pytest.raises(ValueError, match="unfilled"):
        prompts.messages("simulate_activations", explanation="x")


def test_parse_simulation_aligns_lines_and_counts_unreadable():
    assert prompts.parse_simulation("The\t0\n cat\t10\n sat\t3\n", 3) == ([0.0, 10.0, 3.0], 0)
    assert prompts.parse_simulation("The\t0\n cat\t15\n", 3) == ([0.0, 10.0, 0.0], 1)  # clipped; one missing
    assert prompts.parse_simulation("a\tx\nb 4\n", 2) == ([0.0, 4.0], 1)
    assert prompts.parse_simulation("e\t**query**\t7", 1) == ([7.0], 0)
    assert prompts.parse_simulation("", 2) == ([0.0, 0.0], 2)


def test_parse_answers_and_rating_and_explanation():
    assert prompts.parse_answers("1: 1\n2: 0\n3: yes\nfoo", 4) == [1, 0, 1, None]
    assert prompts.parse_rating("Rating: 4 out of 5") == 4
    assert prompts.parse_rating("5") == 5 and prompts.parse_rating(" 3.") == 3
    assert prompts.parse_rating("none") is None
    assert prompts.parse_rating("1. the<< cat>> sat") is None  # an echoed excerpt, not a rating
    assert prompts.parse_rating("12") is None and prompts.parse_rating("7") is None
    assert prompts.clean_explanation('\n"Explanation: animal names"\nmore') == "animal names"


def test_trim_and_scaled():
    ctx = {"tokens": list("abcdefg"), "acts": [0, 1, 2, 3, 4, 5, 6], "peak": 3}
    assert prompts.trim(ctx, 1, 2) == {"tokens": list("cdef"), "acts": [2, 3, 4, 5], "peak": 1}
    assert prompts.scaled([0, 2, 4, -1], 4) == [0, 5, 10, 0]
    assert prompts.scaled([1, 2], 0) == [0, 0]


# --------------------------------------------------------------------------- the dashboard data autointerp reads


def test_site_reader_returns_the_written_contract(tmp_path):
    site = write_synthetic_site(tmp_path / "site", "lorsa")
    rows = read_index(site)
    assert [r["id"] for r in rows] == [0, 1, 2, 3] and rows[3]["alive"] is False
    recs = read_records(site, [0, 1])
    top = recs[0]["top"][0]
    toks = tokens_of(SENTENCES[0])
    assert top["tokens"] == toks and top["peak"] == toks.index(" cat") and "z" in top
    assert top["acts"] == [activation(0, t) for t in toks]
    windows = read_random_windows(site)
    assert len(windows) == len(SENTENCES)
    ctx = window_context(windows[1], 1)
    assert ctx["acts"] == [activation(1, t) for t in tokens_of(SENTENCES[1])]
    attach_autointerp(site, {"judge": "j", "features": {"0": {"explanation": "animals"}}})
    assert read_manifest(site)["files"]["autointerp"] == AUTOINTERP_DATA
    assert "animals" in (site / AUTOINTERP_DATA).read_text()
    assert read_records(site, [0])[0]["top"][0] == top  # the site still reads back unchanged


def test_samples_hold_out_odd_ranked_top_and_random_windows(tmp_path):
    site = write_synthetic_site(tmp_path / "site")
    rec = read_records(site, [0])[0]
    f = feature_data(rec, read_random_windows(site), "sae", explain_top=8, explain_quantile=1, score_top=2,
                     score_random=3, before=20, after=20, seed=0)
    def cut(c):
        return {k: c[k] for k in ("tokens", "acts", "peak")}

    assert f.explain[:len(rec["top"][0::2])] == [cut(c) for c in rec["top"][0::2]]
    assert f.held_top == [cut(c) for c in rec["top"][1::2][:2]]
    assert len(f.held_random) == 3 and all(not any(c["acts"]) for c in f.negatives)
    assert not any(c in f.explain for c in f.held_top)


def test_random_explanations_never_keep_their_own():
    expl = {i: {"activation": f"e{i}"} for i in range(7)}
    for seed in range(20):
        fake = random_explanations(expl, seed)
        assert all(fake[i]["activation"] != f"e{i}" for i in expl)
        assert sorted(v["activation"] for v in fake.values()) == sorted(f"e{i}" for i in expl)
    one = random_explanations({5: {"activation": "x"}}, 0)
    assert one[5]["activation"] in prompts.random_explanations()


# --------------------------------------------------------------------------- config, cache


def test_configs_reject_unknown_keys_and_parse_lists():
    with pytest.raises(RanklensError, match="unknown option"):
        ScoreConfig.build({"base_url": "x", "temprature": 0})
    cfg = CompareConfig.build({"methods": "simulation,detection", "feature_ids": "3,5"})
    assert cfg.methods == ["simulation", "detection"] and cfg.feature_ids == [3, 5]
    with pytest.raises(RanklensError):
        ScoreConfig.build({"methods": "simulation,telepathy"})


def test_cache_key_is_the_full_request(tmp_path):
    cache = DiskCache(tmp_path)
    req = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0.0}
    assert cache.get(req) is None
    cache.put(req, {"content": "hello", "prompt_tokens": 1, "completion_tokens": 1})
    assert cache.get(dict(req))["content"] == "hello"
    for change in ({"max_tokens": 6}, {"model": "n"}, {"seed": 1},
                   {"messages": [{"role": "user", "content": "hi!"}]}):
        assert cache.get({**req, **change}) is None
        assert request_key({**req, **change}) != request_key(req)
    assert len(cache) == 1


# --------------------------------------------------------------------------- the client's errors, over real HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Refuses(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_POST(self):  # noqa: N802 - the stdlib's name
        type(self).hits += 1
        body = json.dumps({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_refused_key_is_one_line_and_not_retried(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RANKLENS_TEST_KEY", "sk-wrong")
        cfg = JudgeConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="m",
                          api_key_env="RANKLENS_TEST_KEY", retry_base_seconds=0.01)
        judge = Judge(cfg, tmp_path)
        with pytest.raises(RanklensError, match=r"refused the key from \$RANKLENS_TEST_KEY \(HTTP 401\)") as err:
            judge.complete_all([([{"role": "user", "content": "hi"}], 4)] * 3)
        assert "\n" not in str(err.value)
        assert judge.usage.requests >= 1 and _Refuses.hits == judge.usage.requests <= 3  # never retried
    finally:
        server.shutdown()


def test_unreachable_server_is_one_line_after_retries(tmp_path):
    cfg = JudgeConfig(base_url=f"http://127.0.0.1:{_free_port()}/v1", model="m", max_retries=2,
                      retry_base_seconds=0.01)
    judge = Judge(cfg, tmp_path)
    with pytest.raises(RanklensError, match=r"is unreachable after 3 tries .*rerun the same command to resume"):
        judge.complete([{"role": "user", "content": "hi"}], 4)
    assert judge.usage.requests == 3


def test_no_endpoint_configured_says_what_to_give(tmp_path):
    with pytest.raises(RanklensError, match="--base-url"):
        Judge(JudgeConfig(), tmp_path)


def test_cli_help_lists_the_autointerp_commands(capsys):
    from ranklens.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser(["autointerp", "--help"]).parse_args(["autointerp", "--help"])
    out = capsys.readouterr().out
    assert "explain" in out and "score" in out and "compare" in out


