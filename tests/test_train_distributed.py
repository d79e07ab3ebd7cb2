"""Training under torchrun with gloo ranks on this CPU: two data-parallel ranks against one process on the same
store, global batch and seed give the same SAE (float32: the replicas' moments are summed in another order, so to a
stated tolerance), the same dead counts and metrics; resuming needs the same world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ranklens.data.collect import collect
from ranklens.data.config import CollectConfig
from ranklens.train.config import SAETrainConfig
from ranklens.train.sae_job import train_sae

RTOL, ATOL = 2e-4, 2e-5  # float32 after 16 steps of Adam


@pytest.fixture(scope="module")
def store(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "store"
    collect(CollectConfig(model=str(tiny_dir / "model"), sites="L1.attn_out", corpus=str(tiny_dir / "corpus"),
                          tokens=5000, context_length=64, dtype="float32"), out, progress=False)
    return out


def _args(tiny_dir, store, **extra) -> list[str]:
    values = dict(model=str(tiny_dir / "model"), site="L1.attn_out", corpus=str(tiny_dir / "corpus"),
                  store=str(store), tokens=4096, batch_size=256, expansion=4, k=4, context_length=64, dtype="float32",
                  eval_tokens=500, lm_eval_tokens=200, warmup_steps=1, lr=3e-3, init="asi", d_init=8,
                  init_tokens=2000, checkpoint_every=4, log_every=2, shuffle_buffer_tokens=1024, aux_k=16)
    values.update(extra)
    return values


def _torchrun(values: dict, out, nproc: int) -> subprocess.CompletedProcess:
    flags = [f for k, v in values.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ranklens.cli", "train", "sae", *flags, "--quiet", "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "sae" / "sae_weights.safetensors"))


def test_two_data_parallel_ranks_equal_one_process(tiny_dir, store, tmp_path):
    values = _args(tiny_dir, store)
    one = train_sae(SAETrainConfig(**values), tmp_path / "one", progress=False)
    run = _torchrun(values, tmp_path / "two", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL, msg=key)
    assert two["train_dead"] == one["train_dead"] and two["tokens"] == one["tokens"] == 4096
    assert two["fvu"] == pytest.approx(one["fvu"], rel=1e-3) and two["eval_dead"] == one["eval_dead"]
    rows_one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert r2["dead"] == r1["dead"] and r2["n_tokens"] == r1["n_tokens"] if "n_tokens" in r1 else True
        assert r2["fvu"] == pytest.approx(r1["fvu"], rel=1e-3) and r2["l0"] == pytest.approx(r1["l0"], rel=1e-6)


def test_a_run_resumes_only_with_its_world_size(tiny_dir, store, tmp_path):
    values = _args(tiny_dir, store, tokens=2048)
    first = _torchrun(values, tmp_path / "run", 2)
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "run" / "metrics.json").unlink()  # as if killed after the last checkpoint
    done = subprocess.run([sys.executable, "-m", "ranklens.cli", "train", "sae",
                           *[f for k, v in values.items() for f in (f"--{k.replace('_', '-')}", str(v))],
                           "--quiet", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 2 and "written by 2 data-parallel x 1 feature-sharded ranks" in done.stderr
    again = _torchrun(values, tmp_path / "run", 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").exists()


def test_torchrun_needs_a_store(tiny_dir, store, tmp_path):
    values = _args(tiny_dir, store)
    del values["store"]
    run = _torchrun(values, tmp_path / "run", 2)
    assert run.returncode != 0 and "reads an existing activation store" in run.stderr


@pytest.mark.parametrize("nproc, shards", [(2, 2), (4, 2)], ids=["2 blocks", "2 replicas x 2 blocks"])
def test_feature_sharded_ranks_equal_one_process(tiny_dir, store, tmp_path, nproc, shards):
    """Blocks of features on separate ranks (exact global TopK and AuxK over the blocks), alone and combined with
    data parallelism, give the one-process SAE, dead counts and metrics."""
    values = _args(tiny_dir, store, init="standard")
    one = train_sae(SAETrainConfig(**values), tmp_path / "one", progress=False)
    run = _torchrun({**values, "shards": shards}, tmp_path / "many", nproc)
    assert run.returncode == 0, run.stderr[-3000:]
    many = json.loads((tmp_path / "many" / "metrics.json").read_text())
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "many")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL, msg=key)
    assert many["train_dead"] == one["train_dead"] and many["eval_dead"] == one["eval_dead"]
    assert many["fvu"] == pytest.approx(one["fvu"], rel=1e-3)
    rows = [json.loads(x) for x in (tmp_path / "many" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["aux_loss"] for r in rows) > 0 and max(r["dead"] for r in rows) > 0  # AuxK over blocks was used
    assert sorted(p.name for p in (tmp_path / "many").glob("checkpoint.shard*")) == [
        f"checkpoint.shard{s}-of-{shards}{suffix}" for s in range(shards) for suffix in
        (".prev.safetensors", ".safetensors")]


def test_bad_layouts_are_one_line_before_work(tiny_dir, store, tmp_path):
    run = _torchrun({**_args(tiny_dir, store), "shards": 3}, tmp_path / "bad", 2)
    assert run.returncode != 0 and "--shards 3 does not divide the 2 ranks" in run.stderr
    run = _torchrun({**_args(tiny_dir, store), "n_features": 101, "shards": 2}, tmp_path / "bad2", 2)
    assert run.returncode != 0 and "split into equal blocks" in run.stderr
    assert not (tmp_path / "bad2").exists()
    values = _args(tiny_dir, store)
    del values["site"]
    run = _torchrun({**values, "sites": "L1.attn_out"}, tmp_path / "bad3", 2)
    assert run.returncode != 0 and "--sites trains its SAEs in one process" in run.stderr
    assert not (tmp_path / "bad3").exists()


@pytest.fixture(scope="module")
def lorsa_store(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-lorsa") / "store"
    collect(CollectConfig(model=str(tiny_dir / "model"), sites="L1.attn_in,L1.attn_out",
                          corpus=str(tiny_dir / "corpus"), tokens=3000, context_length=64, dtype="float32"), out,
            progress=False)
    return out


def test_two_data_parallel_ranks_train_the_one_process_lorsa(tiny_dir, lorsa_store, tmp_path):
    from ranklens.train.config import LorsaTrainConfig
    from ranklens.train.lorsa_job import train_lorsa

    values = dict(model=str(tiny_dir / "model"), corpus=str(tiny_dir / "corpus"), store=str(lorsa_store), layer=1,
                  heads=16, qk_groups=4, k=3, tokens=2048, batch_tokens=256, context_length=64, dtype="float32",
                  eval_tokens=300, lm_eval_tokens=100, warmup_steps=1, lr=3e-3, aux_k=4, checkpoint_every=4,
                  log_every=2, output_bias="mean", init_tokens=500)
    one = train_lorsa(LorsaTrainConfig(**values), tmp_path / "one", progress=False)
    flags = [f for k, v in values.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ranklens.cli",
           "train", "lorsa", *flags, "--quiet", "--out", str(tmp_path / "two")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    a = load_file(str(tmp_path / "one" / "lorsa" / "lorsa.safetensors"))
    b = load_file(str(tmp_path / "two" / "lorsa" / "lorsa.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL, msg=key)
    assert two["train_dead"] == one["train_dead"] and two["tokens"] == one["tokens"]
    assert two["fvu"] == pytest.approx(one["fvu"], rel=1e-3)


def test_a_store_collected_by_two_ranks_is_one_store(tiny_dir, store, tmp_path):
    """torchrun collect: each rank stores every other batch; the one manifest reads as the one-process store (the
    same sequences, in another shard order), resumes per rank, and refuses another world size."""
    from ranklens.data.store import ActivationStore

    args = ["--model", str(tiny_dir / "model"), "--sites", "L1.attn_out", "--corpus", str(tiny_dir / "corpus"),
            "--tokens", "5000", "--context-length", "64", "--dtype", "float32", "--shard-tokens", "800", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ranklens.cli",
           "collect", *args, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = ActivationStore(store), ActivationStore(tmp_path / "two")
    two.verify()
    assert two.n_tokens == one.n_tokens and two.docs_consumed == one.docs_consumed
    assert two.held_out() == one.held_out()
    key = lambda sb: tuple(sb.input_ids[0, : int(sb.lengths[0])].tolist())  # noqa: E731
    seqs_one = {key(sb): sb for sb in one.sequences(["L1.attn_out"], 1, seed=0)}
    seqs_two = {key(sb): sb for sb in two.sequences(["L1.attn_out"], 1, seed=0)}
    assert seqs_one.keys() == seqs_two.keys()
    for k, sb in seqs_two.items():
        assert torch.equal(sb.acts["L1.attn_out"], seqs_one[k].acts["L1.attn_out"])
    assert {p.name for p in (tmp_path / "two").iterdir()} >= {"rank-0", "rank-1", "manifest.json"}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]  # a rerun reuses (and verifies) it
    three = subprocess.run([*cmd[:4], "--nproc_per_node=3", *cmd[5:]], capture_output=True, text=True, timeout=600,
                           env=env)
    assert three.returncode != 0 and "collected by 2 ranks" in three.stderr
