"""Fault injection, as a hostile user would do it: concurrent writers, a malicious checkpoint, a torn log line, a
truncated checkpoint, bad values, bad paths, overflowing activations, a binary corpus, a flipped shard on rerun.
Each is a one-line error (exit status 2) or a correct result, never a traceback and never a half-written run."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ranklens.cli import main
from ranklens.data.store import ActivationStoreWriter
from ranklens.train.config import SAETrainConfig
from ranklens.train.sae_job import train_sae
from ranklens.train.trainer import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, Trainer

_CLI_WITH_CTRL_C = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "from ranklens.cli import main; sys.exit(main(sys.argv[1:]))")


def _sae_args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "sae", "--model", str(tiny_dir / "model"), "--site", "L1.attn_out", "--corpus",
            str(tiny_dir / "corpus"), "--tokens", "4096", "--batch-size", "256", "--expansion", "4", "--k", "4",
            "--context-length", "64", "--dtype", "float32", "--eval-tokens", "500", "--lm-eval-tokens", "300",
            "--warmup-steps", "1", "--checkpoint-every", "4", "--log-every", "2", "--shuffle-buffer-tokens", "1024",
            "--quiet", "--out", str(out), *extra]


def _cfg(tiny_dir: Path, **overrides) -> SAETrainConfig:
    values = dict(model=str(tiny_dir / "model"), site="L1.attn_out", corpus=str(tiny_dir / "corpus"), tokens=4096,
                  batch_size=256, expansion=4, k=4, context_length=64, dtype="float32", eval_tokens=500,
                  lm_eval_tokens=300, warmup_steps=1, checkpoint_every=4, log_every=2, shuffle_buffer_tokens=1024)
    values.update(overrides)
    return SAETrainConfig(**values)


def _cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("ranklens: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def _killed_at(monkeypatch, step: int) -> None:
    """The next training run dies (KeyboardInterrupt, as Ctrl-C) when it is about to take `step`."""
    real = Trainer._one_step

    def dying(self, batch):
        if self.step == step:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Trainer, "_one_step", dying)


def _state(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "sae" / "sae_weights.safetensors"))


# --------------------------------------------------------------------------- 1. a lock on every run directory


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of a directory, as a running job does."""
    procs = []

    def hold(directory: Path) -> int:
        code = ("import sys, time; from ranklens.lock import DirectoryLock; lock = DirectoryLock(sys.argv[1]).acquire(); "
                "print('locked', flush=True); time.sleep(120)")
        proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked"
        procs.append(proc)
        return proc.pid

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("job", ["train sae", "spectrum", "reproduce", "train lorsa"])
def test_a_second_writer_is_refused_with_the_holders_pid(job, tiny_dir, tmp_path, holder, capsys):
    out = tmp_path / "run"
    pid = holder(out)
    common = ["--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus"), "--context-length", "64",
              "--dtype", "float32", "--quiet", "--out", str(out)]
    args = {"train sae": _sae_args(tiny_dir, out),
            "spectrum": ["spectrum", "--sites", "L1.attn_out", "--tokens", "500", *common],
            "reproduce": ["reproduce", "--experiments", "asi", "--seeds", "1", *common],
            "train lorsa": ["train", "lorsa", "--layer", "1", "--tokens", "1000", "--batch-tokens", "256", *common]}
    code, err = _cli(args[job], capsys)
    _one_line_error(code, err, f"is in use by process {pid}")
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing written


def test_two_real_trainings_into_one_directory(tiny_dir, tmp_path):
    """Two `ranklens train sae` processes on one directory: the second is refused while the first trains; the
    metrics log has each step once."""
    out = tmp_path / "run"
    # Ctrl-C's handler set explicitly: a suite started in the background by a shell (`make test &`) has SIGINT ignored,
    # children inherit that, and Python then installs no KeyboardInterrupt at startup
    args = [sys.executable, "-c", _CLI_WITH_CTRL_C, *_sae_args(tiny_dir, out, "--tokens", "2048000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it logged a step; make it longer"
        # paused mid-training, so it still holds the lock however fast this machine finishes the run
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(args, capture_output=True, text=True, env=env)
        assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGINT)  # pending while stopped: delivered before it runs another step
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=60) == 130
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


# --------------------------------------------------------------------------- 2. no pickle


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint.pt would do with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_checkpoint_runs_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _killed_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train_sae(_cfg(tiny_dir), run, progress=False)
    monkeypatch.undo()
    for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME):
        (run / name).unlink(missing_ok=True)
    marker = tmp_path / "pwned"
    torch.save({"step": 4, "objective": _Payload(marker)}, run / "checkpoint.pt")  # a format-1 name
    capsys.readouterr()
    metrics = train_sae(_cfg(tiny_dir), run, progress=False)
    assert not marker.exists()  # the pickle was never executed
    err = capsys.readouterr().err
    assert "checkpoint.pt is not a readable checkpoint" in err and "starts over from step 0" in err
    assert _state(run)["W_dec"].shape == (128, 32) and metrics["tokens"] == 4096


def test_a_crafted_tensor_tree_is_refused_not_executed(tmp_path):
    from safetensors.torch import save_file

    from ranklens.tensor_tree import FORMAT, TreeFileError, load_tree, save_tree

    path = tmp_path / "x.safetensors"
    save_file({"t0": torch.zeros(1)}, str(path), metadata={"format": FORMAT, "tree": '{"eval": "__import__(0)"}'})
    with pytest.raises(TreeFileError, match="unknown node kind 'eval'"):
        load_tree(path)
    tree = {"step": 3, 0: {"m": torch.arange(3.0)}, "betas": (0.9, 0.999), "inf": float("inf"), "none": None}
    back = load_tree(save_tree(tmp_path / "ok.safetensors", tree))
    assert back["step"] == 3 and back["betas"] == (0.9, 0.999) and back["inf"] == float("inf")
    assert torch.equal(back[0]["m"], torch.arange(3.0)) and back["none"] is None


# --------------------------------------------------------------------------- 3. torn log line, truncated checkpoint


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
    whole = train_sae(_cfg(tiny_dir), tmp_path / "whole", progress=False)
    run = tmp_path / "run"
    _killed_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train_sae(_cfg(tiny_dir), run, progress=False)
    monkeypatch.undo()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "tok')  # a kill in the middle of an append
    capsys.readouterr()
    assert train_sae(_cfg(tiny_dir), run, progress=False)["fvu"] == whole["fvu"]
    assert "dropped the torn last line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]
    assert torch.equal(_state(run)["W_dec"], _state(tmp_path / "whole")["W_dec"])


def test_a_torn_line_before_the_last_is_an_error(tiny_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _killed_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train_sae(_cfg(tiny_dir), run, progress=False)
    monkeypatch.undo()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")
    code, err = _cli(_sae_args(tiny_dir, run), capsys)
    _one_line_error(code, err, "metrics.jsonl line 1 is not a JSON row")


@pytest.mark.parametrize("damaged", [(CHECKPOINT_NAME,), (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME)])
def test_a_truncated_checkpoint_falls_back_bit_exactly(damaged, tiny_dir, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    train_sae(_cfg(tiny_dir), whole, progress=False)
    run = tmp_path / "run"
    _killed_at(monkeypatch, 10)  # checkpoints at steps 4 and 8
    with pytest.raises(KeyboardInterrupt):
        train_sae(_cfg(tiny_dir), run, progress=False)
    monkeypatch.undo()
    for name in damaged:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    train_sae(_cfg(tiny_dir), run, progress=False)
    err = capsys.readouterr().err
    assert f"{CHECKPOINT_NAME} is not a readable checkpoint" in err
    assert ("starts over from step 0" in err) == (len(damaged) == 2)
    assert torch.equal(_state(run)["W_dec"], _state(whole)["W_dec"])
    assert (run / "metrics.jsonl").read_text().count('"step": 2,') == 1


# --------------------------------------------------------------------------- 4. validation before writing


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "--lr -1: input should be greater than 0"),
    ("--batch-size", "0", "--batch-size 0: input should be greater than 0"),
    ("--n-features", "0", "--n-features 0: input should be greater than or equal to 1"),
    ("--expansion", "0", "--expansion 0: input should be greater than or equal to 1"),
    ("--k", "0", "--k 0: input should be greater than or equal to 1"),
    ("--d-init", "-3", "--d-init -3"),
    ("--warmup-steps", "-1", "--warmup-steps -1"),
])
def test_bad_values_are_refused_before_anything_is_written(flag, value, message, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _cli(_sae_args(tiny_dir, out, flag, value), capsys)
    _one_line_error(code, err, message)
    assert not out.exists()


def test_a_directory_holding_only_a_refused_runs_config_is_taken_over(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _cli(_sae_args(tiny_dir, out, "--k", "1000"), capsys)  # valid alone, too many for 128 features
    _one_line_error(code, err, "--k 1000")
    code, err = _cli(_sae_args(tiny_dir, out, "--corpus", str(tmp_path / "empty")), capsys)
    assert code == 2
    assert (out / "config.yaml").exists() or not out.exists()
    code, _ = _cli(_sae_args(tiny_dir, out), capsys)  # the corrected command
    assert code == 0 and (out / "metrics.json").exists()


# --------------------------------------------------------------------------- 5. bad paths, overflow, binary corpus


def test_out_under_a_file_is_refused_before_the_model_loads(tiny_dir, tmp_path, capsys, monkeypatch):
    import ranklens.data.collect as collect_module

    blocker = tmp_path / "file"
    blocker.write_text("x")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(collect_module, "load_model", no_model)
    code, err = _cli(["collect", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus"),
                      "--sites", "L1.attn_out", "--tokens", "100", "--quiet", "--out", str(blocker / "store")], capsys)
    _one_line_error(code, err, "lies under", "which is a file")
    code, err = _cli(_sae_args(tiny_dir, blocker), capsys)
    _one_line_error(code, err, "is a file; expected a directory")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="runs the CLI as user nobody (needs root and setpriv)")
def test_an_unwritable_out_is_one_line(tiny_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    for parent in (tmp_path, *tmp_path.parents):  # let nobody reach tmp_path, not write into it
        parent.chmod(parent.stat().st_mode | stat.S_IXOTH)
    args = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "ranklens.cli",
            *_sae_args(tiny_dir, locked / "run")]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "is not writable" in done.stderr, done.stderr


def test_overflowing_activations_name_the_site_and_the_magnitude(tmp_path, tiny_dir, capsys):
    store = tmp_path / "store"
    meta = {"model": str(tiny_dir / "model"), "corpus": str(tiny_dir / "corpus"), "seed": 0, "context_length": 64,
            "code_version": "test"}
    writer = ActivationStoreWriter.open(store, meta, {"L1.attn_out": 32}, torch.float32, shard_tokens=10_000)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        acts = torch.randn(4, 64, 32, generator=g) * 1e20
        writer.add({"L1.attn_out": acts}, torch.full((4,), 64), torch.ones(4, 64, dtype=torch.bool),
                   torch.ones(4, 64, dtype=torch.int64), docs_consumed=4)
    writer.finish()
    code, err = _cli(_sae_args(tiny_dir, tmp_path / "run", "--store", str(store), "--tokens", "2048"), capsys)
    _one_line_error(code, err, "the SAE on L1.attn_out", "reach |x| = ", "e+20", "overflow float32")


def test_a_corpus_of_nul_bytes_is_refused_as_binary(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "binary.txt"
    corpus.write_bytes(b"\x00" * 4096)
    code, err = _cli(["collect", "--model", str(tiny_dir / "model"), "--corpus", str(corpus), "--sites",
                      "L1.attn_out", "--tokens", "100", "--context-length", "64", "--quiet", "--out",
                      str(tmp_path / "store")], capsys)
    _one_line_error(code, err, "holds a NUL byte", "not a binary file")


def test_rerunning_collect_on_a_complete_store_finds_a_flipped_shard(tiny_dir, tmp_path, capsys):
    out = tmp_path / "store"
    args = ["collect", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus"), "--sites",
            "L1.attn_out", "--tokens", "1000", "--shard-tokens", "300", "--batch-tokens", "256", "--context-length",
            "64", "--dtype", "float32", "--quiet", "--out", str(out)]
    assert _cli(args, capsys)[0] == 0
    shard = sorted(out.glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, err = _cli(args, capsys)
    _one_line_error(code, err, shard.name, "(corrupted)")


def test_results_are_group_readable(tiny_dir, tmp_path):
    run = tmp_path / "run"
    train_sae(_cfg(tiny_dir), run, progress=False)
    files = [*run.glob("activations/*.safetensors"), *run.glob("sae/*"), run / "metrics.json"]
    assert files and all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in files)
