"""Corpus sources: the embedded corpus, local files, hf: datasets, their order and their errors."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
import zstandard

from ranklens.data import corpus
from ranklens.data.corpus import (
    EMBEDDED_SUBSETS,
    describe_corpus,
    embedded_path,
    iter_documents,
    list_embedded,
    load_manifest,
    read_jsonl_zst,
)
from ranklens.errors import RanklensError


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_jsonl_zst(path: Path, records: list[object]) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return path


def write_parquet(path: Path, columns: dict[str, list[object]], row_group_size: int = 3) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


DOCS = [f"document number {i}" for i in range(25)]


# ------------------------------------------------------------------------------------------------------------
# embedded corpus
# ------------------------------------------------------------------------------------------------------------
def test_embedded_subsets_load_and_are_non_empty() -> None:
    assert set(EMBEDDED_SUBSETS) >= {"prose", "code", "zh"}
    manifest = load_manifest()
    for subset in EMBEDDED_SUBSETS:
        docs = list(iter_documents(subset))
        assert len(docs) == manifest["subsets"][subset]["n_documents"] > 0
        assert all(d.strip() for d in docs)
    zh = "".join(list(iter_documents("zh"))[:5])
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in zh) > len(zh) / 2


def test_manifest_counts_and_file_hashes() -> None:
    manifest = load_manifest()
    assert sum(s["n_tokens"] for s in manifest["subsets"].values()) >= 2_000_000
    for subset, entry in manifest["subsets"].items():
        data = embedded_path(subset).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["n_bytes"]
        slices = entry["slices"]
        assert sum(s["n_tokens"] for s in slices) == entry["n_tokens"]
        assert sum(s["n_documents"] for s in slices) == entry["n_documents"]
        for s in slices:
            assert s["package"] and s["version"] and s["license"] and s["notice"] and s["provenance"]
            assert "://" not in s["provenance"]
    assert sum(s["n_bytes"] for s in manifest["subsets"].values()) < 12_000_000


def test_records_name_their_slice() -> None:
    manifest = load_manifest()
    for subset in EMBEDDED_SUBSETS:
        slices = {s["name"] for s in manifest["subsets"][subset]["slices"]}
        records = list(read_jsonl_zst(embedded_path(subset)))
        assert {r["source"].split("/", 1)[0] for r in records} == slices
        assert [r["text"] for r in records] == list(iter_documents(subset, seed=None))


def test_list_embedded() -> None:
    entries = {e["name"]: e for e in list_embedded()}
    assert list(entries)[0] == "default"
    assert entries["default"]["subsets"] == list(EMBEDDED_SUBSETS)
    assert entries["default"]["n_tokens"] == sum(entries[s]["n_tokens"] for s in EMBEDDED_SUBSETS)


def test_same_seed_same_order_and_different_seed_different_order() -> None:
    first = list(iter_documents("default", seed=7))
    assert first == list(iter_documents("default", seed=7))
    other = list(iter_documents("default", seed=8))
    assert other != first and sorted(other) == sorted(first)
    assert list(iter_documents("default", seed=None)) != first  # the stored order is not the shuffled one


def test_default_interleaves_all_subsets() -> None:
    subset_of = {d: s for s in EMBEDDED_SUBSETS for d in iter_documents(s, seed=None)}
    docs = list(iter_documents("default", seed=0))
    assert sorted(docs) == sorted(subset_of)
    assert {subset_of[d] for d in docs[:100]} == set(EMBEDDED_SUBSETS)


def test_plus_combines_subsets_in_a_canonical_order() -> None:
    combined = list(iter_documents("prose+zh", seed=3))
    assert sorted(combined) == sorted([*iter_documents("prose"), *iter_documents("zh")])
    assert list(iter_documents("zh+prose", seed=3)) == combined
    assert list(iter_documents("prose+prose", seed=3)) == list(iter_documents("prose", seed=3))
    assert list(iter_documents("default+zh", seed=3)) == list(iter_documents("default", seed=3))
    assert describe_corpus("zh+prose")["name"] == "prose+zh"


def test_shuffle_is_pinned() -> None:
    # a resumed run skips the documents it consumed, so the permutation for a seed must never change
    items = list(range(10))
    corpus._shuffle(items, random.Random(0))
    assert items == [9, 4, 0, 5, 2, 7, 1, 3, 6, 8]


def test_describe_embedded() -> None:
    info = describe_corpus("default")
    manifest = load_manifest()
    assert info["kind"] == "embedded" and info["name"] == "default"
    assert info["n_documents"] == sum(s["n_documents"] for s in manifest["subsets"].values())
    assert {s: f["sha256"] for s, f in info["files"].items()} == {
        s: e["sha256"] for s, e in manifest["subsets"].items()
    }


# ------------------------------------------------------------------------------------------------------------
# local files
# ------------------------------------------------------------------------------------------------------------
def test_txt_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("Line one.\n\nLine two.\n", encoding="utf-8")
    assert list(iter_documents(str(path))) == ["Line one.\n\nLine two.\n"]
    info = describe_corpus(str(path))
    assert info["kind"] == "txt" and info["n_documents"] == 1
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_directory_of_txt_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    names = ["b.txt", "a.txt", "sub/c.txt", "d.txt"]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(f"text of {name} {i}", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a corpus file", encoding="utf-8")
    stored = list(iter_documents(str(tmp_path), seed=None))
    assert stored == [
        f"text of {n} {names.index(n)}" for n in sorted(names)
    ]  # sorted by path, blanks skipped
    shuffled = list(iter_documents(str(tmp_path), seed=1))
    assert sorted(shuffled) == sorted(stored)
    assert shuffled == list(iter_documents(str(tmp_path), seed=1))
    assert describe_corpus(str(tmp_path))["n_files"] == 5


def test_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"text": "   "}) + "\n" + json.dumps({"text": None}) + "\n")
    assert list(iter_documents(str(path), seed=None)) == DOCS
    shuffled = list(iter_documents(str(path), seed=5))
    assert shuffled != DOCS and sorted(shuffled) == sorted(DOCS)
    assert shuffled == list(iter_documents(str(path), seed=5))
    assert shuffled != list(iter_documents(str(path), seed=6))


def test_jsonl_zst_streams_through_a_shuffle_buffer(tmp_path: Path) -> None:
    path = write_jsonl_zst(tmp_path / "c.jsonl.zst", [{"text": d} for d in DOCS])
    assert list(iter_documents(str(path), seed=None)) == DOCS
    assert [r["text"] for r in read_jsonl_zst(path)] == DOCS
    for buffer in (4, 100):  # smaller and larger than the file
        shuffled = list(iter_documents(str(path), seed=2, shuffle_buffer=buffer))
        assert shuffled != DOCS and sorted(shuffled) == sorted(DOCS)
        assert shuffled == list(iter_documents(str(path), seed=2, shuffle_buffer=buffer))


def test_parquet_in_row_group_batches(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "c.parquet", {"text": [*DOCS, None, " "], "n": list(range(len(DOCS) + 2))}
    )
    assert list(iter_documents(str(path), seed=None)) == DOCS
    shuffled = list(iter_documents(str(path), seed=4))
    assert shuffled != DOCS and sorted(shuffled) == sorted(DOCS)
    assert shuffled == list(iter_documents(str(path), seed=4))
    assert describe_corpus(str(path))["n_rows"] == len(DOCS) + 2


# ------------------------------------------------------------------------------------------------------------
# hf:
# ------------------------------------------------------------------------------------------------------------
def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    train = datasets.Dataset.from_dict({"text": [*DOCS, ""], "label": list(range(len(DOCS) + 1))})
    datasets.DatasetDict({"train": train, "test": train.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "single"))

    assert list(iter_documents(f"hf:{tmp_path / 'single'}", seed=None)) == DOCS
    shuffled = list(iter_documents(f"hf:{tmp_path / 'single'}", seed=9))
    assert shuffled != DOCS and sorted(shuffled) == sorted(DOCS)
    assert shuffled == list(iter_documents(f"hf:{tmp_path / 'single'}", seed=9))
    assert list(iter_documents(f"hf:{tmp_path / 'dd'}", seed=None)) == DOCS  # split defaults to train
    assert list(iter_documents(f"hf:{tmp_path / 'dd'}:test", seed=None)) == DOCS[:3]
    with pytest.raises(RanklensError, match="nosuchsplit"):
        list(iter_documents(f"hf:{tmp_path / 'dd'}:nosuchsplit"))

    no_text = tmp_path / "no_text"
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(no_text))
    with pytest.raises(RanklensError, match="'text' field"):
        list(iter_documents(f"hf:{no_text}"))


def test_hf_without_datasets_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(RanklensError, match="datasets"):
        iter_documents("hf:some/dataset")


def test_hf_spec_parsing() -> None:
    spec = corpus.parse_spec("hf:org/name:cfg:validation")
    assert (spec.kind, spec.name, spec.hf_config, spec.hf_split) == ("hf", "org/name", "cfg", "validation")
    spec = corpus.parse_spec("hf:org/name::test")
    assert (spec.hf_config, spec.hf_split) == (None, "test")
    assert corpus.parse_spec("hf:org/name").hf_split == "train"


# ------------------------------------------------------------------------------------------------------------
# errors: one line, naming the bad value
# ------------------------------------------------------------------------------------------------------------
def _error(spec: str, **kwargs: object) -> str:
    with pytest.raises(RanklensError) as info:
        list(iter_documents(spec, **kwargs))  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_corpus_name() -> None:
    message = _error("wikipedia")
    assert "'wikipedia'" in message
    for expected in ("default", "prose", "code", "zh", ".jsonl.zst", ".parquet", "hf:NAME"):
        assert expected in message
    assert "'nope'" in _error("prose+nope")


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.jsonl")
    assert missing in _error(missing)
    assert "absent.txt" in _error("absent.txt")


def test_unsupported_extension(tmp_path: Path) -> None:
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n", encoding="utf-8")
    message = _error(str(csv))
    assert str(csv) in message and ".parquet" in message
    assert "other.csv" in _error(str(tmp_path / "other.csv"))


def test_jsonl_without_text_field(tmp_path: Path) -> None:
    for path in (
        write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}]),
        write_jsonl_zst(tmp_path / "a.jsonl.zst", [{"content": "x"}]),
    ):
        message = _error(str(path))
        assert str(path) in message and "'text'" in message and "content" in message
    later = write_jsonl(tmp_path / "later.jsonl", [{"text": "fine"}, {"body": "x"}])
    assert "line 2" in _error(str(later), seed=None)
    assert "later.jsonl" in _error(str(later), seed=0)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    assert "bad.jsonl" in _error(str(bad_json), seed=None)
    wrong_type = write_jsonl(tmp_path / "num.jsonl", [{"text": 3}])
    assert "num.jsonl" in _error(str(wrong_type))


def test_parquet_without_text_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", {"body": ["x", "y"]})
    message = _error(str(path))
    assert str(path) in message and "'text'" in message and "body" in message
    ints = write_parquet(tmp_path / "ints.parquet", {"text": [1, 2]})
    assert "ints.parquet" in _error(str(ints))


def test_empty_corpora(tmp_path: Path) -> None:
    blank_txt = tmp_path / "blank.txt"
    blank_txt.write_text(" \n\t\n", encoding="utf-8")
    assert str(blank_txt) in _error(str(blank_txt))
    blank_jsonl = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "  "}])
    assert str(blank_jsonl) in _error(str(blank_jsonl))
    empty_zst = write_jsonl_zst(tmp_path / "empty.jsonl.zst", [])
    assert str(empty_zst) in _error(str(empty_zst))
    no_txt = tmp_path / "no_txt"
    no_txt.mkdir()
    (no_txt / "readme.md").write_text("x", encoding="utf-8")
    assert str(no_txt) in _error(str(no_txt))
    all_blank = tmp_path / "all_blank"
    all_blank.mkdir()
    (all_blank / "a.txt").write_text("\n", encoding="utf-8")
    assert str(all_blank) in _error(str(all_blank))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    assert str(path) in _error(str(path))


def test_bad_specs_fail_before_iteration(tmp_path: Path) -> None:
    # the errors a look at the input reveals come from the call itself, not from the first next()
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": "x"}])
    for spec in ("wikipedia", str(tmp_path / "absent.txt"), str(path), "hf:"):
        with pytest.raises(RanklensError):
            iter_documents(spec)
