"""Real corpora: a long .txt split into contexts (every token used), the App. E.2 truncation kept as the default
elsewhere, --text-field for .jsonl/.parquet/hf, and pre-tokenized documents (an input_ids field) used as they are."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ranklens.cli import main
from ranklens.data.config import CollectConfig
from ranklens.data.corpus import iter_documents, parse_spec, splits_documents
from ranklens.data.store import ActivationStore
from ranklens.data.tokenize import token_batches
from ranklens.errors import RanklensError


@pytest.fixture(scope="module")
def long_txt(tmp_path_factory) -> tuple:
    """A 42 KB .txt file made of embedded prose (one document)."""
    docs, size = [], 0
    for doc in iter_documents("prose", seed=0):
        docs.append(doc)
        size += len(doc.encode())
        if size >= 42_000:
            break
    text = "\n\n".join(docs).encode()[:42_000].decode(errors="ignore")
    path = tmp_path_factory.mktemp("txt") / "book.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


def _ordinary_ids(batches) -> list[int]:
    return [int(t) for b in batches for t in b.input_ids[b.stat_mask].tolist()]


def test_42kb_txt_yields_all_its_tokens(long_txt, smollm2):
    path, text = long_txt
    assert 41_000 <= path.stat().st_size <= 42_000
    tok = smollm2.tokenizer
    every = tok(text, add_special_tokens=False)["input_ids"]
    assert splits_documents(str(path))  # a single .txt file: split, not truncated
    batches = list(token_batches(iter_documents(str(path)), tok, 1024, 8192, split=splits_documents(str(path))))
    ids = _ordinary_ids(batches)
    assert len(every) > 8_000 and ids == every  # all of them, in order
    assert [b.n_docs for b in batches] == [1, 0]  # one document, counted once, in the batch that starts it
    assert all(int(row[0]) == tok.bos_token_id for b in batches for row in b.input_ids)  # each context framed
    assert max(int(b.lengths.max()) for b in batches) == 1024
    # The paper's truncation (App. E.2) when asked for: one context of 1,023 tokens behind <bos>.
    truncated = f"truncate:{path}"
    assert not splits_documents(truncated)
    assert _ordinary_ids(token_batches(iter_documents(truncated), tok, 1024, split=False)) == every[:1023]


def test_truncation_stays_the_default_for_other_corpora(tmp_path):
    assert not splits_documents("prose") and not splits_documents("default")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    assert not splits_documents(str(tmp_path / "d"))
    assert splits_documents(f"split:{tmp_path / 'd'}") and parse_spec(f"split:{tmp_path / 'd'}").kind == "txt_dir"


def test_collect_stores_every_token_of_a_long_txt(tiny_dir, long_txt, tmp_path, capsys):
    """`ranklens collect` on the .txt file: the store holds all its tokens, and reports the split."""
    path, text = long_txt
    from ranklens.lm.load import load_model

    tok = load_model(str(tiny_dir / "model"), "float32").tokenizer
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    out = tmp_path / "store"
    code = main(["collect", "--model", str(tiny_dir / "model"), "--sites", "L0.attn_out", "--corpus", str(path),
                 "--tokens", str(10 * n), "--context-length", "128", "--dtype", "float32", "--quiet",
                 "--out", str(out)])
    assert code == 0
    store = ActivationStore(out)
    assert store.n_tokens == n  # every token; the corpus ran out before the 10x asked for
    assert "ran out" in capsys.readouterr().err
    # Held-out text starts after the document, even where the store holds only part of it.
    part = tmp_path / "part"
    assert main(["collect", "--model", str(tiny_dir / "model"), "--sites", "L0.attn_out", "--corpus", str(path),
                 "--tokens", "500", "--context-length", "128", "--dtype", "float32", "--quiet",
                 "--out", str(part)]) == 0
    assert ActivationStore(part).n_tokens == 500 and ActivationStore(part).held_out().start_doc == 1


def test_text_field_and_pretokenized_jsonl(tmp_path, smollm2):
    tok = smollm2.tokenizer
    rows = [{"content": "The first document.", "text": "ignored"}, {"content": "A second one here.", "text": "x"}]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(iter_documents(f"{jsonl}#content", seed=None)) == [r["content"] for r in rows]
    assert list(iter_documents(str(jsonl), seed=None)) == ["ignored", "x"]  # default field: text
    with pytest.raises(RanklensError, match="no field 'body'"):
        list(iter_documents(f"{jsonl}#body", seed=None))

    # --text-field on a job config folds into the corpus spec every reader sees (and reads back the same).
    cfg = CollectConfig(sites="L0.attn_out", corpus=str(jsonl), text_field="content")
    assert cfg.corpus == f"{jsonl}#content"
    assert CollectConfig(**cfg.model_dump()).corpus == cfg.corpus

    # Pre-tokenized: an input_ids field is used as it is (no tokenizer, no added bos), cut at the context.
    ids = [[5, 6, 7, 8, 9], [10, 11, 12]]
    pre = tmp_path / "pre.jsonl"
    pre.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids))
    assert list(iter_documents(str(pre), seed=None)) == ids
    batches = list(token_batches(iter_documents(str(pre), seed=None), tok, context_length=4))
    assert [row[:n].tolist() for b in batches for row, n in zip(b.input_ids, b.lengths, strict=True)] == [
        [5, 6, 7, 8], [10, 11, 12]]
    split = list(token_batches(iter_documents(f"split:{pre}", seed=None), tok, 4, split=True))
    assert _ordinary_ids(split) == [5, 6, 7, 8, 9, 10, 11, 12]


def test_text_field_and_pretokenized_parquet(tmp_path):
    table = pa.table({"body": ["alpha beta", "gamma"], "input_ids": [[1, 2, 3], [4]]})
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path)
    assert list(iter_documents(f"{path}#body", seed=None)) == ["alpha beta", "gamma"]
    assert list(iter_documents(str(path), seed=None)) == [[1, 2, 3], [4]]  # no text column: the token ids
    with pytest.raises(RanklensError, match="field applies to"):
        parse_spec(f"{tmp_path}#body")


def test_text_field_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"page": ["one page", "two pages"]}).save_to_disk(str(tmp_path / "ds"))
    assert sorted(iter_documents(f"hf:{tmp_path / 'ds'}#page", seed=0)) == ["one page", "two pages"]
    with pytest.raises(RanklensError, match="--text-field"):
        list(iter_documents(f"hf:{tmp_path / 'ds'}", seed=0))


def test_killed_collect_of_a_split_txt_resumes_to_the_same_store(tiny_dir, long_txt, tmp_path):
    """The .txt is one document, so no shard ends at a document boundary: a killed collect resumes by the batches
    on disk (not by documents) and completes the same store, shard for shard, without repeating a token."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path, _ = long_txt

    def args(out):
        return [sys.executable, "-m", "ranklens.cli", "collect", "--model", str(tiny_dir / "model"), "--sites",
                "L0.attn_out", "--corpus", str(path), "--tokens", "6000", "--context-length", "64", "--dtype",
                "float32", "--batch-tokens", "256", "--shard-tokens", "300", "--quiet", "--out", str(out)]

    def shards(out):
        return [(s["file"], s["sha256"]) for s in json.loads((out / "manifest.json").read_text())["shards"]]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run(args(whole), env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(args(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once some but not all shards are on disk
        if (killed / "manifest.json").exists() and len(shards(killed)) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(shards(killed)) < len(shards(whole))
    assert ActivationStore(killed).docs_consumed == 1  # mid-document: a document count could not resume it
    assert subprocess.run(args(killed), env=env, capture_output=True).returncode == 0
    assert shards(killed) == shards(whole)
    assert ActivationStore(killed).n_tokens == ActivationStore(whole).n_tokens == 6000


def test_report_states_how_documents_were_cut(long_txt):
    from ranklens.reproduce.presets import ReproduceConfig
    from ranklens.reproduce.report import scale

    plan = {"d_model": 64, "n_layers": 3, "middle_layer": 1, "sweep_layers": [0, 1]}
    paper = scale(ReproduceConfig.load(preset="quick"), plan)["documents"]
    assert paper == "truncated to 1,024 tokens behind <bos> (App. E.2)"
    split = scale(ReproduceConfig.load(preset="quick", corpus=str(long_txt[0])), plan)["documents"]
    assert split.startswith("split into contexts of 1,024 tokens")
