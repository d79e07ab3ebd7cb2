"""`ranklens spectrum` under torchrun: two gloo ranks share the accumulation and give the one-process numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from ranklens.spectrum.job import run_spectrum
from test_spectrum_job import _config

ARGS = ["--sites", "L*.attn_out,L*.mlp_out,L1.attn_z", "--tokens", "1500", "--context-length", "64",
        "--batch-tokens", "256", "--dtype", "float32", "--loss-recovered", "L1.attn_out", "--loss-tokens", "300",
        "--loss-points", "4", "--decompose", "1", "--splits", "2", "--gram-dtype", "float64", "--quiet"]


def _torchrun(tiny_dir, out, nproc: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ranklens.cli", "spectrum", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus"),
           *ARGS, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_two_ranks_give_the_one_process_spectrum(tiny_dir, tmp_path):
    single = run_spectrum(_config(tiny_dir, batch_tokens=256), tmp_path / "one", progress=False, report=False)
    run = _torchrun(tiny_dir, tmp_path / "two", 2)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("report:") == 1  # rank 0 alone finishes the job
    two = json.loads((tmp_path / "two" / "spectrum.json").read_text())
    assert two["n_tokens"] == single["n_tokens"] == 1500
    assert sorted((tmp_path / "two" / "state").glob("accumulators.rank*")) == [
        tmp_path / "two" / "state" / f"accumulators.rank{r}-of-2.safetensors" for r in range(2)]
    by_site = {r["site"]: r for r in single["records"]}
    for rec in two["records"]:
        ref = by_site[rec["site"]]
        assert rec["n_tokens"] == ref["n_tokens"]
        s, s_ref = (torch.tensor(r["singular_values"], dtype=torch.float64) for r in (rec, ref))
        torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9 * float(s_ref[0]))  # merge order only
        assert abs(rec["effective_rank"] - ref["effective_rank"]) < 1e-9 * ref["effective_rank"]
        if "stability" in ref:  # the same batches go to the same App. C split
            assert rec["stability"]["n_tokens"] == ref["stability"]["n_tokens"]
            for key in ("erank_mean", "erank_cv"):
                assert abs(rec["stability"][key] - ref["stability"][key]) <= 1e-9 * abs(ref["stability"][key]) + 1e-12
    curve = {r["site"]: r for r in two["records"]}["L1.attn_out"]["loss_recovered"]
    ref_curve = by_site["L1.attn_out"]["loss_recovered"]
    assert curve["n"] == ref_curve["n"] and curve["n_99"] == ref_curve["n_99"]

    # A rerun (one process or two) reuses the finished run.
    again = _torchrun(tiny_dir, tmp_path / "two", 2)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "two" / "spectrum.json").read_text()) == two


def test_a_directory_of_another_run_stops_every_rank(tiny_dir, tmp_path):
    run_spectrum(_config(tiny_dir, tokens=600, loss_recovered=None, decompose=None, splits=1), tmp_path / "run",
                 progress=False, report=False)
    run = _torchrun(tiny_dir, tmp_path / "run", 2)  # rank 0 refuses the directory; rank 1 must not wait forever
    assert run.returncode != 0
    assert run.stderr.count("ranklens: error:") == 2 and "another" in run.stderr
