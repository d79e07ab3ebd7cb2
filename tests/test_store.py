"""The activation store: round trip, the token and sequence readers, kill/resume, and damaged stores."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ranklens.data.store import (
    MANIFEST_NAME,
    ActivationStore,
    ActivationStoreWriter,
    SequenceBatch,
)
from ranklens.errors import RanklensError

SITES = {"L0.attn_in": 4, "L0.attn_out": 3}
META = {"model": "tiny", "corpus": "rand", "seed": 0, "context_length": 12, "code_version": "test"}
B, T = 3, 12
DOCS_PER_BATCH = B + 1  # one document per batch is skipped (e.g. empty), so docs_consumed != n_sequences
N_BATCHES = 24
SHARD_TOKENS = 40


def make_batch(i: int) -> dict:
    """Batch i of a deterministic stream: right-padded rows with garbage in the padding, bos at position 0."""
    g = torch.Generator().manual_seed(1000 + i)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    pos = torch.arange(T)[None, :]
    valid = pos < lengths[:, None]
    eos = torch.rand(B, generator=g) < 0.3  # some rows end with an eos that does not count
    stat_mask = valid & (pos > 0) & ~(eos[:, None] & (pos == lengths[:, None] - 1))
    acts = {site: torch.randn(B, T, d, generator=g) for site, d in SITES.items()}
    input_ids = torch.randint(0, 50_000, (B, T), generator=g)
    return {
        "acts": acts,
        "lengths": lengths,
        "stat_mask": stat_mask,
        "input_ids": input_ids,
        "docs_consumed": (i + 1) * DOCS_PER_BATCH,
    }


def expected_sequences(batches: range) -> list[dict]:
    out = []
    for i in batches:
        b = make_batch(i)
        for r in range(B):
            n = int(b["lengths"][r])
            out.append(
                {
                    "acts": {s: b["acts"][s][r, :n] for s in SITES},
                    "input_ids": b["input_ids"][r, :n],
                    "stat_mask": b["stat_mask"][r, :n],
                }
            )
    return out


def expected_tokens(site: str, batches: range = range(N_BATCHES)) -> torch.Tensor:
    return torch.cat([s["acts"][site][s["stat_mask"]] for s in expected_sequences(batches)])


def write_store(
    directory: Path, batches: range = range(N_BATCHES), finish: bool = True, **kw
) -> ActivationStoreWriter:
    w = ActivationStoreWriter.open(directory, META, SITES, kw.pop("dtype", torch.float32), **kw)
    for i in batches:
        w.add(**make_batch(i))
    if finish:
        w.finish()
    return w


def sort_rows(x: torch.Tensor) -> np.ndarray:
    a = x.float().numpy()
    return a[np.lexsort(a.T[::-1])]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("store") / "acts"
    write_store(d, shard_tokens=SHARD_TOKENS)
    return d


def all_sequences(store: ActivationStore, seed=None, batch_size=5) -> dict[int, dict]:
    out = {}
    for batch in store.sequences(list(SITES), batch_size=batch_size, seed=seed):
        for r, sid in enumerate(batch.sequence_ids.tolist()):
            n = int(batch.lengths[r])
            out[sid] = {
                "acts": {s: batch.acts[s][r, :n] for s in SITES},
                "input_ids": batch.input_ids[r, :n],
                "stat_mask": batch.stat_mask[r, :n],
            }
    return out


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = ActivationStore(a), ActivationStore(b)
    assert sa.manifest == sb.manifest  # includes every shard's size, sha256 and docs_consumed
    sa.verify()
    sb.verify()
    for s in SITES:
        assert torch.equal(torch.cat(list(sa.iter_tokens(s))), torch.cat(list(sb.iter_tokens(s))))


# ---------------------------------------------------------------------------------------------------------------


def test_round_trip(store_dir: Path) -> None:
    store = ActivationStore(store_dir)
    exp = expected_sequences(range(N_BATCHES))
    assert store.complete
    assert store.meta == META
    assert store.sites == SITES
    assert store.dtype == torch.float32
    assert store.n_sequences == len(exp)
    assert store.n_tokens == sum(int(s["stat_mask"].sum()) for s in exp)
    assert store.n_positions == sum(len(s["input_ids"]) for s in exp)
    assert store.docs_consumed == N_BATCHES * DOCS_PER_BATCH
    # shards are cut at the first batch boundary at or past shard_tokens
    assert len(store.shards) > 3
    assert all(s.n_tokens >= SHARD_TOKENS for s in store.shards[:-1])
    assert all(s.n_sequences % B == 0 and s.docs_consumed % DOCS_PER_BATCH == 0 for s in store.shards)
    assert store.shards[-1].docs_consumed == store.docs_consumed

    got = all_sequences(store)
    assert sorted(got) == list(range(len(exp)))
    for i, e in enumerate(exp):
        for s in SITES:
            assert torch.equal(got[i]["acts"][s], e["acts"][s])
        assert torch.equal(got[i]["input_ids"], e["input_ids"])
        assert torch.equal(got[i]["stat_mask"], e["stat_mask"])
    for s in SITES:
        assert torch.equal(torch.cat(list(store.iter_tokens(s))), expected_tokens(s))
        chunks = list(store.iter_tokens(s, chunk_tokens=7))
        assert max(len(c) for c in chunks) <= 7
        assert torch.equal(torch.cat(chunks), expected_tokens(s))

    # the manifest and the shard files follow the documented format
    man = json.loads((store_dir / MANIFEST_NAME).read_text())
    assert man["format_version"] == 1 and man["complete"] is True
    assert man["sites"] == {s: {"d": d} for s, d in SITES.items()}
    assert man["dtype"] == "float32" and man["n_tokens"] == store.n_tokens
    from safetensors import safe_open

    with safe_open(str(store_dir / man["shards"][0]["file"]), framework="pt") as f:
        assert f.metadata()["format_version"] == "1"
        assert f.get_tensor("input_ids").dtype == torch.int32
        assert f.get_tensor("stat_mask").dtype == torch.bool
        assert f.get_tensor("seq_offsets").shape == (man["shards"][0]["n_sequences"] + 1,)


def test_round_trip_bfloat16(tmp_path: Path) -> None:
    write_store(tmp_path / "bf", range(4), dtype=torch.bfloat16, shard_tokens=10)
    store = ActivationStore(tmp_path / "bf")
    assert store.dtype == torch.bfloat16
    for s in SITES:
        got = torch.cat(list(store.iter_tokens(s)))
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, expected_tokens(s, range(4)).bfloat16())
        assert next(store.token_batches(s, 4, 16, seed=0, dtype=torch.float32)).dtype == torch.float32


def test_token_batches_multiset_and_seed(store_dir: Path) -> None:
    store = ActivationStore(store_dir)
    site = "L0.attn_in"
    exp = expected_tokens(site)
    kw = {"batch_size": 8, "buffer_tokens": 64}
    full = list(store.token_batches(site, seed=1, drop_last=False, **kw))
    assert all(len(b) == 8 for b in full[:-1]) and 1 <= len(full[-1]) <= 8
    np.testing.assert_array_equal(sort_rows(torch.cat(full)), sort_rows(exp))
    # shuffled: not the storage order
    assert not torch.equal(torch.cat(full), exp)

    dropped = list(store.token_batches(site, seed=1, **kw))
    assert all(b.shape == (8, SITES[site]) for b in dropped)
    assert len(exp) - 8 < 8 * len(dropped) <= len(exp)
    if len(exp) % 8:
        assert len(dropped) == len(full) - 1

    again = list(store.token_batches(site, seed=1, drop_last=False, **kw))
    assert all(torch.equal(a, b) for a, b in zip(full, again, strict=True))
    other = list(store.token_batches(site, seed=2, drop_last=False, **kw))
    assert not torch.equal(torch.cat(other), torch.cat(full))
    np.testing.assert_array_equal(sort_rows(torch.cat(other)), sort_rows(exp))

    two = torch.cat(list(store.token_batches(site, seed=3, epochs=2, drop_last=False, **kw)))
    np.testing.assert_array_equal(sort_rows(two), sort_rows(torch.cat([exp, exp])))
    forever = store.token_batches(site, seed=3, epochs=None, **kw)
    assert len([next(forever) for _ in range(3 * len(full))]) == 3 * len(full)


@pytest.mark.parametrize(("epochs", "drop_last"), [(1, True), (1, False), (2, False)])
def test_token_batches_start_batch_resumes(store_dir: Path, epochs: int, drop_last: bool) -> None:
    store = ActivationStore(store_dir)
    kw = {"batch_size": 8, "buffer_tokens": 40, "seed": 7, "epochs": epochs, "drop_last": drop_last}
    full = list(store.token_batches("L0.attn_out", **kw))
    for k in (1, 2, 3, len(full) // 2, len(full) - 1, len(full), len(full) + 3):
        tail = list(ActivationStore(store_dir).token_batches("L0.attn_out", start_batch=k, **kw))
        assert len(tail) == max(0, len(full) - k)
        assert all(torch.equal(a, b) for a, b in zip(full[k:], tail, strict=True))


def test_token_batches_skip_reads_little(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ranklens.data import store as store_module

    rows_read = []
    original = store_module._OpenShard.stat_rows

    def counting(self, site, r0, r1):
        rows_read.append(r1 - r0)
        return original(self, site, r0, r1)

    monkeypatch.setattr(store_module._OpenShard, "stat_rows", counting)
    store = ActivationStore(store_dir)
    kw = {"batch_size": 8, "buffer_tokens": 40, "seed": 7, "epochs": 2}
    n_batches = sum(1 for _ in store.token_batches("L0.attn_in", **kw))
    assert sum(rows_read) == 2 * store.n_tokens  # a full pass reads every token once per epoch
    rows_read.clear()
    assert len(list(store.token_batches("L0.attn_in", start_batch=n_batches, **kw))) == 0
    assert rows_read == []  # skipping everything reads no activations
    last = list(store.token_batches("L0.attn_in", start_batch=n_batches - 1, **kw))
    assert len(last) == 1 and sum(rows_read) < store.n_tokens  # only the final buffer is read


def test_incomplete_store_can_be_required_complete(tmp_path: Path) -> None:
    write_store(tmp_path / "acts", range(8), finish=False, shard_tokens=SHARD_TOKENS).close()
    assert not ActivationStore(tmp_path / "acts").complete
    with pytest.raises(RanklensError, match="incomplete"):
        ActivationStore(tmp_path / "acts", require_complete=True)


def test_token_batches_rejects_bad_arguments(store_dir: Path) -> None:
    store = ActivationStore(store_dir)
    with pytest.raises(RanklensError, match="buffer_tokens"):
        store.token_batches("L0.attn_in", batch_size=8, buffer_tokens=10, seed=0)
    with pytest.raises(RanklensError, match="L9.mlp_out"):
        store.token_batches("L9.mlp_out", batch_size=8, buffer_tokens=64, seed=0)


def test_sequence_reader(store_dir: Path) -> None:
    store = ActivationStore(store_dir)
    exp = expected_sequences(range(N_BATCHES))
    batches = list(store.sequences(["L0.attn_out"], batch_size=4))
    assert sum(len(b.lengths) for b in batches) == len(exp)
    for b in batches:
        assert isinstance(b, SequenceBatch)
        n, t_max = b.input_ids.shape
        assert set(b.acts) == {"L0.attn_out"}
        assert b.acts["L0.attn_out"].shape == (n, t_max, 3)
        assert t_max == int(b.lengths.max())
        assert b.input_ids.dtype == torch.int64
        assert torch.equal(b.attention_mask, torch.arange(t_max)[None, :] < b.lengths[:, None])
        assert not (b.stat_mask & ~b.attention_mask).any()
        assert (b.acts["L0.attn_out"][~b.attention_mask] == 0).all()
        assert (b.input_ids[~b.attention_mask] == 0).all()
    assert torch.equal(torch.cat([b.sequence_ids for b in batches]), torch.arange(len(exp)))
    assert [len(b.lengths) for b in store.sequences(["L0.attn_out"], batch_size=4, drop_last=True)] == [4] * (
        len(exp) // 4
    )

    shuffled = all_sequences(store, seed=5)
    order = [
        sid for b in store.sequences(list(SITES), batch_size=5, seed=5) for sid in b.sequence_ids.tolist()
    ]
    assert sorted(order) == list(range(len(exp))) and order != sorted(order)
    assert order == [sid for b in store.sequences(list(SITES), 5, seed=5) for sid in b.sequence_ids.tolist()]
    assert order != [sid for b in store.sequences(list(SITES), 5, seed=6) for sid in b.sequence_ids.tolist()]
    for i, e in enumerate(exp):
        assert torch.equal(shuffled[i]["acts"]["L0.attn_in"], e["acts"]["L0.attn_in"])
        assert torch.equal(shuffled[i]["stat_mask"], e["stat_mask"])


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path: Path, store_dir: Path) -> None:
    d = tmp_path / "acts"
    w = ActivationStoreWriter.open(d, META, SITES, torch.float32, shard_tokens=SHARD_TOKENS)
    for i in range(N_BATCHES):
        w.add(**make_batch(i))
        if len(w.shards) >= 2 and w.buffered_tokens > 0:
            break  # some sequences are only in memory when the writer is lost
    assert i < N_BATCHES - 1
    listed = len(w.shards)
    assert listed >= 2
    del w  # dropped without finish
    gc.collect()
    # debris a killed run can leave: a half-written manifest, a half-written shard, a shard renamed but not listed
    (d / ".manifest.json.tmp").write_text('{"format": "ranklens-activa')
    shard0 = (d / "shard-000000.safetensors").read_bytes()
    (d / f".shard-{listed:06d}.safetensors.tmp").write_bytes(shard0[: len(shard0) // 2])
    (d / f"shard-{listed:06d}.safetensors").write_bytes(shard0)
    (d / ".tmpAb12Cd").write_bytes(shard0[:100])  # safetensors' own temporary inside save_file

    w = ActivationStoreWriter.open(d, META, SITES, torch.float32)
    assert not w.complete and w.shard_tokens == SHARD_TOKENS
    assert len(w.shards) == listed
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [MANIFEST_NAME, ".lock"] + [f"shard-{i:06d}.safetensors" for i in range(listed)]
    )
    assert w.docs_consumed == w.shards[-1].docs_consumed
    assert w.docs_consumed % DOCS_PER_BATCH == 0 and w.docs_consumed < (i + 1) * DOCS_PER_BATCH
    assert w.n_tokens == sum(s.n_tokens for s in w.shards)
    for i in range(w.docs_consumed // DOCS_PER_BATCH, N_BATCHES):
        w.add(**make_batch(i))
    w.finish()
    assert_same_store(d, store_dir)


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
from test_store import META, N_BATCHES, SHARD_TOKENS, SITES, make_batch
from ranklens.data.store import ActivationStoreWriter

w = ActivationStoreWriter.open(sys.argv[1], META, SITES, torch.float32, shard_tokens=SHARD_TOKENS)
announced = False
for i in range(N_BATCHES):
    w.add(**make_batch(i))
    if len(w.shards) >= 2 and not announced:
        print("two shards on disk", flush=True)
        announced = True
    if announced:
        time.sleep(0.003)
time.sleep(60)  # never finishes: the parent kills it
"""


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path, store_dir: Path) -> None:
    d = tmp_path / "acts"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(tests=str(Path(__file__).parent))))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), str(d)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "two shards on disk"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    killed = ActivationStore(d)
    assert not killed.complete and len(killed.shards) >= 2
    killed.verify()  # whatever was listed is whole

    w = ActivationStoreWriter.open(d, META, SITES, torch.float32)
    assert w.docs_consumed == w.shards[-1].docs_consumed
    for i in range(w.docs_consumed // DOCS_PER_BATCH, N_BATCHES):
        w.add(**make_batch(i))
    w.finish()
    assert_same_store(d, store_dir)


def test_reopening_a_complete_store_does_not_duplicate(tmp_path: Path) -> None:
    d = tmp_path / "acts"
    write_store(d, range(6), shard_tokens=SHARD_TOKENS)
    before = (d / MANIFEST_NAME).read_bytes()
    w = ActivationStoreWriter.open(d, META, SITES, torch.float32)
    assert w.complete
    assert w.docs_consumed == 6 * DOCS_PER_BATCH
    with pytest.raises(RanklensError, match="complete"):
        w.add(**make_batch(6))
    store = w.finish()  # no-op
    assert store.n_sequences == 6 * B
    assert (d / MANIFEST_NAME).read_bytes() == before


def test_mismatched_run_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "acts"
    write_store(d, range(3), finish=False, shard_tokens=SHARD_TOKENS).close()
    with pytest.raises(RanklensError, match=r"meta\['seed'\] is 0 there, 1 requested"):
        ActivationStoreWriter.open(d, {**META, "seed": 1}, SITES, torch.float32)
    with pytest.raises(RanklensError, match="sites"):
        ActivationStoreWriter.open(d, META, {"L0.attn_in": 4}, torch.float32)
    with pytest.raises(RanklensError, match="dtype is float32 there, bfloat16 requested"):
        ActivationStoreWriter.open(d, META, SITES, torch.bfloat16)
    with pytest.raises(RanklensError, match="shard_tokens"):
        ActivationStoreWriter.open(d, META, SITES, torch.float32, shard_tokens=SHARD_TOKENS + 1)
    with pytest.raises(RanklensError, match="code_version"):
        ActivationStoreWriter.open(tmp_path / "new", {"model": "tiny"}, SITES, torch.float32)


def test_unrelated_files_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "notes"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(RanklensError, match="notes.txt"):
        ActivationStoreWriter.open(d, META, SITES, torch.float32)
    assert [p.name for p in d.iterdir()] == ["notes.txt"]  # nothing was created there
    (d / "notes.txt").unlink()
    (d / "shard-000000.safetensors").write_bytes(b"x")
    with pytest.raises(RanklensError, match="no manifest.json"):
        ActivationStoreWriter.open(d, META, SITES, torch.float32)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RanklensError, match="is a file"):
        ActivationStoreWriter.open(tmp_path / "file", META, SITES, torch.float32)


def test_second_writer_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "acts"
    w = write_store(d, range(2), finish=False)
    with pytest.raises(RanklensError, match="is in use by process"):
        ActivationStoreWriter.open(d, META, SITES, torch.float32)
    w.close()
    ActivationStoreWriter.open(d, META, SITES, torch.float32).close()


def _damaged_copy(tmp_path: Path, store_dir: Path) -> tuple[Path, Path]:
    d = tmp_path / "copy"
    d.mkdir()
    for p in store_dir.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    return d, d / "shard-000001.safetensors"


def test_truncated_shard_is_named(tmp_path: Path, store_dir: Path) -> None:
    d, shard = _damaged_copy(tmp_path, store_dir)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(RanklensError, match="shard-000001.safetensors"):
        ActivationStore(d)
    with pytest.raises(RanklensError, match="shard-000001.safetensors"):
        ActivationStoreWriter.open(d, META, SITES, torch.float32)


def test_truncated_header_is_named_without_sha_check(tmp_path: Path, store_dir: Path) -> None:
    d, shard = _damaged_copy(tmp_path, store_dir)
    size = shard.stat().st_size
    shard.write_bytes(b"\xff" * size)  # same size, garbage header
    store = ActivationStore(d, verify_on_read=False)
    with pytest.raises(RanklensError, match=r"shard-000001.safetensors is not a readable safetensors"):
        list(store.iter_tokens("L0.attn_in"))


def test_flipped_byte_is_named(tmp_path: Path, store_dir: Path) -> None:
    d, shard = _damaged_copy(tmp_path, store_dir)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # inside a tensor: the file still parses
    shard.write_bytes(bytes(data))
    store = ActivationStore(d)  # sizes match; the hash is checked on first read
    with pytest.raises(RanklensError, match="shard-000001.safetensors has sha256"):
        list(store.iter_tokens("L0.attn_in"))
    with pytest.raises(RanklensError, match="shard-000001.safetensors has sha256"):
        ActivationStore(d).verify()
    with pytest.raises(RanklensError, match="shard-000001.safetensors has sha256"):
        list(ActivationStore(d).sequences(list(SITES), batch_size=4))


def test_missing_shard_is_named(tmp_path: Path, store_dir: Path) -> None:
    d, shard = _damaged_copy(tmp_path, store_dir)
    shard.unlink()
    with pytest.raises(RanklensError, match="shard-000001.safetensors is listed in the manifest but missing"):
        ActivationStore(d)


def test_add_validates_its_input(tmp_path: Path) -> None:
    w = ActivationStoreWriter.open(tmp_path / "acts", META, SITES, torch.float32)
    b = make_batch(0)
    with pytest.raises(RanklensError, match="L0.attn_out"):
        w.add(**{**b, "acts": {"L0.attn_in": b["acts"]["L0.attn_in"]}})
    with pytest.raises(RanklensError, match=r"acts\['L0.attn_in'\] must be a tensor \[3, 12, 4\]"):
        w.add(**{**b, "acts": {**b["acts"], "L0.attn_in": torch.zeros(B, T, 5)}})
    pad_true = b["stat_mask"] | ~(torch.arange(T)[None, :] < b["lengths"][:, None])
    if not torch.equal(pad_true, b["stat_mask"]):
        with pytest.raises(RanklensError, match="padded positions"):
            w.add(**{**b, "stat_mask": pad_true})
    nan = {**b["acts"], "L0.attn_out": b["acts"]["L0.attn_out"].clone()}
    nan["L0.attn_out"][0, 0, 0] = float("nan")
    with pytest.raises(RanklensError, match="site L0.attn_out hold NaN or inf"):
        w.add(**{**b, "acts": nan})
    w.add(**b)
    with pytest.raises(RanklensError, match="docs_consumed"):
        w.add(**{**make_batch(1), "docs_consumed": 1})
    assert w.buffered_tokens == int(b["stat_mask"].sum())
    store = w.finish()
    assert store.n_sequences == B
    with pytest.raises(RanklensError, match="complete"):
        w.add(**make_batch(1))


def test_shards_are_readable_by_the_group_like_the_manifest(store_dir: Path) -> None:
    """Every shard gets the manifest's mode (ranklens.io.FILE_MODE, 0644), not mkstemp's 0600."""
    import stat

    from ranklens.io import FILE_MODE

    shards = sorted(store_dir.glob("shard-*.safetensors"))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*shards, store_dir / "manifest.json"]}
    assert len(shards) > 1 and set(modes.values()) == {FILE_MODE} and FILE_MODE & 0o040
