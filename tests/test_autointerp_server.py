"""autointerp end to end against a REAL local judge: `transformers serve` with the embedded SmolLM2-135M-Instruct on a
loopback port (tests/judge_server.py). No mock stands in for the server. Kept short (a few features, contexts of
six tokens, small max_tokens): the judge is a 135M model on two shared cores, so these tests check the machinery
(requests, cache, resume, files, dashboard), not the quality of its explanations."""

from __future__ import annotations

import json
import threading
import time

import pytest

from autointerp_data import write_synthetic_site
from judge_server import JudgeServer, free_port
from ranklens.autointerp.config import ExplainConfig, ScoreConfig
from ranklens.autointerp.jobs import run_score
from ranklens.cli import main
from ranklens.dashboard.site_reader import AUTOINTERP_DATA, read_manifest
from ranklens.errors import RanklensError

SMALL = {"concurrency": 2, "max_retries": 1, "retry_base_seconds": 0.2, "timeout": 60, "before": 3, "after": 1,
         "explain_top": 2, "explain_quantile": 0, "score_top": 1, "score_random": 1, "explain_max_tokens": 20}


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    from ranklens.lm.load import model_source

    server = JudgeServer(model_source("smollm2-135m"), tmp_path_factory.mktemp("judge") / "serve.log")
    server.start()
    yield server
    server.stop()


def _cli(judge: JudgeServer, config=ScoreConfig) -> list[str]:
    flags = []
    for key, value in SMALL.items():
        if key not in config.model_fields:
            continue
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return ["--base-url", judge.base_url, "--model", judge.model, *flags, "--quiet"]


def test_score_end_to_end_then_a_rerun_sends_nothing(judge, tmp_path):
    site = write_synthetic_site(tmp_path / "sae-site")
    cfg = ScoreConfig(base_url=judge.base_url, model=judge.model, features=2, methods=["simulation", "detection"],
                      **SMALL)
    first = run_score(site, cfg, tmp_path / "out")
    assert first["judge_model"] == judge.model and first["methods"] == ["simulation", "detection"]
    usage = first["usage"]
    # 2 explanations; per feature 2 simulated contexts and 1 detection prompt, for the explanation and the floor (a
    # floor's prompt can equal a real one: two features may draw the same random window, and the floor of one is
    # the other's explanation; the second is then answered from the cache)
    n_detect = sum(1 for s in first["features"].values() if "detection" in s)  # needs a window where it is quiet
    assert n_detect >= 1 and usage["answered"] + usage["cached"] == 2 + 2 * (2 * 2 + n_detect), usage
    assert usage["requests"] == usage["answered"] and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert len(first["features"]) == 2
    for scores in first["features"].values():
        sim = scores["simulation"]
        assert -1.0 <= sim["all"] <= 1.0 and set(sim) >= {"top", "random", "all", "unread_tokens"}
        assert scores["detection"] is None or 0.0 <= scores["detection"] <= 1.0
        assert "simulation" in scores["random_explanation"]  # the floor, scored the same way
    for m in ("simulation", "detection"):
        assert set(first["summary"][m]) == {"mean", "std", "n", "floor"}
    written = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert written["features"] == first["features"]
    explained = json.loads((tmp_path / "out" / "explanations.json").read_text())["features"]
    assert set(explained) == set(first["features"]) and all(e["activation"] for e in explained.values())
    # the dashboard shows them
    assert read_manifest(site)["files"]["autointerp"] == AUTOINTERP_DATA
    data = (site / AUTOINTERP_DATA).read_text()
    assert all(json.dumps(e["activation"])[1:-1] in data for e in explained.values())

    again = run_score(site, cfg, tmp_path / "out")
    assert again["usage"]["requests"] == 0 and again["usage"]["cached"] == usage["answered"] + usage["cached"]
    assert again["features"] == first["features"]


def test_explain_a_lorsa_head_from_the_command_line(judge, tmp_path, capsys):
    site = write_synthetic_site(tmp_path / "lorsa-site", "lorsa")
    assert main(["autointerp", "explain", str(site), "--feature-ids", "0", "--out", str(tmp_path / "out"),
                 *_cli(judge, ExplainConfig)]) == 0
    got = json.loads((tmp_path / "out" / "explanations.json").read_text())
    assert got["kind"] == "lorsa" and set(got["features"]["0"]) == {"activation", "z_pattern"}  # App. D's two prompts
    assert got["usage"]["answered"] == 2
    assert capsys.readouterr().out.strip()


def test_compare_two_dictionaries_blinded(judge, tmp_path, capsys):
    a = write_synthetic_site(tmp_path / "a")
    b = write_synthetic_site(tmp_path / "b")
    out = tmp_path / "cmp"
    # the floor is tested above; here one feature a side, simulation on one held-out context, and the rubric
    assert main(["autointerp", "compare", str(a), str(b), "--features", "1", "--score-random", "0",
                 "--no-random-baseline", "--out", str(out), *_cli(judge)]) == 0
    got = json.loads((out / "compare.json").read_text())
    assert got["judge_model"] == judge.model and set(got["runs"]) == {"a", "b"}
    assert {r["blind_id"] for side in got["runs"].values() for r in side["features"]} == {0, 1}
    for side in got["runs"].values():
        assert side["summary"]["simulation"]["n"] == 1 and side["summary"]["simulation"]["floor"]["n"] == 0
        assert side["rubric"]["n"] + side["rubric"]["unreadable"] == 1
    assert set(got["tests"]) == {"simulation", "rubric"}
    printed = capsys.readouterr().out
    assert "Welch p" in printed and "rubric" in printed


def test_a_killed_server_gives_one_line_and_the_rerun_resumes(judge, tmp_path, capsys):
    """Last in this module: it kills the shared server, then starts it again on another port (the cache key holds
    no address, so the rerun resumes there)."""
    site = write_synthetic_site(tmp_path / "site")
    out = tmp_path / "out"
    args = ["autointerp", "score", str(site), "--features", "2", "--no-random-baseline", "--out", str(out),
            *_cli(judge)]
    status: list[int] = []
    worker = threading.Thread(target=lambda: status.append(main(args)))
    worker.start()
    deadline = time.monotonic() + 120
    while len(list((out / "cache").glob("*/*.json"))) < 2 and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.05)
    judge.stop()
    worker.join(timeout=60)
    assert status == [2]
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ranklens: error: the judge at http://127.0.0.1:")
    assert "rerun the same command to resume" in err
    done = len(list((out / "cache").glob("*/*.json")))
    assert done >= 2

    judge.port = free_port()
    judge.start()
    cfg = ScoreConfig(base_url=judge.base_url, model=judge.model, features=2, random_baseline=False, **SMALL)
    resumed = run_score(site, cfg, out)
    assert resumed["usage"]["cached"] == done  # nothing answered before the kill is asked again
    assert resumed["usage"]["answered"] + done == 2 + 2 * 2 and len(resumed["features"]) == 2
    with pytest.raises(RanklensError):  # and with no server at all, a fresh request fails the same way
        run_score(site, cfg.model_copy(update={"base_url": f"http://127.0.0.1:{free_port()}/v1", "seed": 1,
                                               "retry_base_seconds": 0.01}), tmp_path / "other")
