"""`ranklens collect` through the real console script: output, errors, and a killed run resuming exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ranklens.cli import main
from ranklens.data.store import ActivationStore
from ranklens.lm.capture import Capturer
from ranklens.lm.load import load_model

RANKLENS = [sys.executable, "-m", "ranklens.cli"]


def _collect_args(tiny_dir: Path, out: Path) -> list[str]:
    return [*RANKLENS, "collect", "--model", str(tiny_dir / "model"), "--sites", "L0.attn_out,L2.resid_post",
            "--corpus", str(tiny_dir / "corpus"), "--tokens", "3000", "--context-length", "64", "--dtype", "float32",
            "--batch-tokens", "256", "--shard-tokens", "300", "--quiet", "--out", str(out)]


def _run(args, capsys) -> subprocess.CompletedProcess:
    """The console script's main() in this process (the import cost of a subprocess is paid once)."""
    capsys.readouterr()
    code = main(args[len(RANKLENS):])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _shards(out: Path) -> list[tuple[str, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["file"], s["sha256"]) for s in manifest["shards"]]


def test_collect_writes_what_capture_sees(tiny_dir, tmp_path, capsys):
    out = tmp_path / "store"
    done = _run(_collect_args(tiny_dir, out), capsys)
    assert done.returncode == 0, done.stderr
    store = ActivationStore(out)
    assert store.complete and store.n_tokens >= 3000 and store.meta["context_length"] == 64
    # The first stored sequence equals a direct capture of the same tokens.
    batch = next(store.sequences(["L0.attn_out", "L2.resid_post"], batch_size=1))
    lm = load_model(str(tiny_dir / "model"), "float32")
    n = int(batch.lengths[0])
    acts = Capturer(lm.model, "L0.attn_out,L2.resid_post")(batch.input_ids[:, :n])
    for site in ("L0.attn_out", "L2.resid_post"):
        torch.testing.assert_close(batch.acts[site][0, :n], acts[site][0], rtol=1e-5, atol=1e-5)


def test_killed_collect_resumes_to_the_same_store(tiny_dir, tmp_path, capsys):
    """A real SIGKILL of the console script mid-run; the rerun completes the same store, shard for shard."""
    whole = tmp_path / "whole"
    assert _run(_collect_args(tiny_dir, whole), capsys).returncode == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_collect_args(tiny_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once some but not all shards are on disk
        if (killed / "manifest.json").exists() and len(_shards(killed)) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _shards(killed)
    assert 2 <= len(partial) < len(_shards(whole))
    assert _run(_collect_args(tiny_dir, killed), capsys).returncode == 0
    assert _shards(killed) == _shards(whole)


@pytest.mark.parametrize("args, message", [
    (["--model", "./nope"], "unknown model './nope'"),
    (["--sites", "L9.attn_out"], "layer 9"),
    (["--sites", "L0.attn_outt"], "unknown site kind 'attn_outt'"),
    (["--corpus", "nonexistent-corpus"], "nonexistent-corpus"),
    (["--tokens", "0"], "--tokens 0"),
])
def test_bad_input_one_line_error(tiny_dir, tmp_path, capsys, args, message):
    base = {"--model": str(tiny_dir / "model"), "--sites": "L0.attn_out", "--corpus": str(tiny_dir / "corpus"),
            "--tokens": "100", "--context-length": "64"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    out = tmp_path / "out"
    done = _run([*RANKLENS, "collect", *sum(([k, v] for k, v in base.items()), []), "--out", str(out)], capsys)
    assert done.returncode == 2
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_directory_holding_another_run(tiny_dir, tmp_path, capsys):
    out = tmp_path / "store"
    assert _run(_collect_args(tiny_dir, out), capsys).returncode == 0
    args = _collect_args(tiny_dir, out)
    args[args.index("--tokens") + 1] = "5000"
    done = _run(args, capsys)
    assert done.returncode == 2 and "holds" in done.stderr


def test_empty_corpus_leaves_nothing(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    out = tmp_path / "out"
    args = _collect_args(tiny_dir, out)
    args[args.index("--corpus") + 1] = str(empty)
    done = _run(args, capsys)
    assert done.returncode == 2 and "empty" in done.stderr.lower(), done.stderr
    assert not out.exists()
