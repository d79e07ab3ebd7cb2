"""Corpora as iterators of document strings.

The paper collects activations from documents of SlimPajama (English web, GitHub, arXiv, ...) and CCI3 (Chinese)
(dimensional-collapse-in-attention-outputs, App. A), truncates each document to 1,024 tokens behind a <bos>
token, and shuffles through a buffer that is reshuffled whenever it is refilled, because positions of one
document are strongly correlated (App. E.2). This module supplies the documents in a reproducible order; the
tokenizer (`ranklens.data.tokenize`) does the truncation and the <bos>.

A corpus spec is one of:

* an embedded corpus shipped in the package (built by ``scripts/build_corpus.py``, see ``manifest.json``):
  ``default`` (every subset), ``prose``, ``code``, ``zh``, or several joined with ``+`` (``prose+zh``).
  Embedded names win over files of the same name in the working directory: write ``./prose`` for those.
* a local path: a ``.txt`` file (one document), a directory of ``.txt`` files (one document per file,
  recursively), a ``.jsonl`` or ``.jsonl.zst`` file (one JSON object per line with a string field ``text``),
  or a ``.parquet`` file (a string column ``text``).
* ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face ``datasets`` name, streamed (``datasets`` is imported only
  then; split defaults to ``train``; ``hf:NAME::SPLIT`` gives a split without a config), or
  ``hf:PATH[:SPLIT]`` with a local directory: one written by ``Dataset.save_to_disk`` is read with
  ``datasets.load_from_disk``, any other directory of data files with ``datasets.load_dataset``; both work
  offline.

Order. With an integer ``seed`` the order is a deterministic shuffle: the same seed gives the same order on
every run and machine (the shuffle draws only ``random.Random(seed).random()``, whose sequence Python keeps
stable across versions), so ``itertools.islice`` can resume a run after the documents it consumed.

* embedded corpora, directories of ``.txt`` and ``.jsonl`` files: a full permutation of all documents
  (for ``.jsonl`` through an index of line offsets, 8 bytes a document, so memory stays bounded);
  the subsets of ``default`` are interleaved by it.
* ``.jsonl.zst`` and ``.parquet``: streamed through a seeded shuffle buffer of ``shuffle_buffer`` documents
  (App. E.2; parquet row groups are also visited in a shuffled order). A file with no more documents than
  the buffer gets a full uniform permutation; a larger one a local shuffle, with memory bounded by the buffer.
* ``hf:`` streams: ``IterableDataset.shuffle(seed=seed, buffer_size=shuffle_buffer)``; on-disk datasets:
  ``Dataset.shuffle(seed=seed)``.

Fields. Records (.jsonl, .parquet, hf:) are read from the field ``text``, or, when a record has no ``text`` but
an ``input_ids`` field, from that: a pre-tokenized document (a list of token ids) is used as it is, without
tokenizing or adding a bos. ``SPEC#FIELD`` (the CLI's ``--text-field FIELD``) reads another field instead
(``data.jsonl#content``, ``hf:NAME:CONFIG:SPLIT#body``, ``rows.parquet#input_ids``); a string field gives text,
a list-of-integers field token ids.

Long documents. The paper truncates every document to one context (App. E.2), and so does ranklens by default;
a single ``.txt`` file is one document, so it is split into consecutive contexts instead (every token used). The
prefixes ``split:SPEC`` and ``truncate:SPEC`` (the CLI's ``--long-documents``) choose for any corpus;
``splits_documents(spec)`` tells the tokenizer (``ranklens.data.tokenize``).

``seed=None`` keeps the stored order. Empty and whitespace-only documents are skipped; a corpus without any
other document is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import random
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from ranklens.config import FIELD_SEPARATOR, LONG_DOCUMENTS
from ranklens.errors import RanklensError

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
MANIFEST_PATH = EMBEDDED_DIR / "manifest.json"
DEFAULT_CORPUS = "default"
TEXT_FIELD = "text"
TOKENS_FIELD = "input_ids"  # a pre-tokenized dataset's column, used when a record has no TEXT_FIELD
Document = str | list[int]  # text, or the token ids of a pre-tokenized document
DEFAULT_SHUFFLE_BUFFER = 10_000
HF_PREFIX = "hf:"
HF_DEFAULT_SPLIT = "train"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".parquet")
ACCEPTED_FILES = ".txt, .jsonl, .jsonl.zst or .parquet files, or a directory of .txt files"


# --------------------------------------------------------------------------------------------------------------
# Embedded corpora
# --------------------------------------------------------------------------------------------------------------
@functools.cache
def load_manifest() -> dict[str, Any]:
    """The manifest of the embedded corpus: per subset its file, sha256, counts and source slices."""
    try:
        return json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RanklensError(
            f"embedded corpus manifest {MANIFEST_PATH} is missing: reinstall ranklens or run "
            "scripts/build_corpus.py"
        ) from exc


def _subset_names() -> tuple[str, ...]:
    try:
        return tuple(load_manifest()["subsets"])
    except RanklensError:
        return ()  # importing must work without the data; using an embedded corpus then fails clearly


EMBEDDED_SUBSETS: tuple[str, ...] = _subset_names()


def embedded_names() -> tuple[str, ...]:
    """Every accepted embedded name: ``default`` and the subsets."""
    return (DEFAULT_CORPUS, *EMBEDDED_SUBSETS)


def list_embedded() -> list[dict[str, Any]]:
    """One entry per embedded name (``default`` first) with its subsets and document and token counts."""
    subsets = load_manifest()["subsets"]
    tokenizer = load_manifest().get("tokenizer", {}).get("name")

    def entry(name: str, members: tuple[str, ...]) -> dict[str, Any]:
        return {
            "name": name,
            "subsets": list(members),
            "n_documents": sum(subsets[m]["n_documents"] for m in members),
            "n_tokens": sum(subsets[m]["n_tokens"] for m in members),
            "tokenizer": tokenizer,
            "sources": [s["name"] for m in members for s in subsets[m]["slices"]],
        }

    return [entry(DEFAULT_CORPUS, EMBEDDED_SUBSETS), *(entry(name, (name,)) for name in EMBEDDED_SUBSETS)]


def embedded_path(subset: str) -> Path:
    """The .jsonl.zst file of one embedded subset."""
    if subset not in EMBEDDED_SUBSETS:
        raise RanklensError(
            f"unknown embedded subset {subset!r}: expected one of {', '.join(EMBEDDED_SUBSETS)}"
        )
    return EMBEDDED_DIR / load_manifest()["subsets"][subset]["file"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def _embedded_documents(subset: str) -> tuple[str, ...]:
    """All documents of one subset in stored order, checked against the manifest's sha256 (a few MB: cached)."""
    path = embedded_path(subset)
    expected = load_manifest()["subsets"][subset]["sha256"]
    if not path.is_file():
        raise RanklensError(f"embedded corpus file {path} is missing: reinstall ranklens")
    if sha256_file(path) != expected:
        raise RanklensError(
            f"embedded corpus file {path} does not match its sha256 in manifest.json: "
            "reinstall ranklens or rerun scripts/build_corpus.py"
        )
    return tuple(_texts_of_records(path, iter_jsonl_records(path), TEXT_FIELD))


# --------------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------------
def _is_zst(path: Path) -> bool:
    return path.name.endswith(".jsonl.zst")


def open_text(path: Path) -> io.TextIOBase:
    """A text stream over a .jsonl or .jsonl.zst file; zstd is decompressed as it is read (bounded memory)."""
    raw: BinaryIO = path.open("rb")
    if _is_zst(path):
        # read_across_frames: files made by concatenating zstd frames (``zstd a b > c``) are valid too
        raw = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return io.TextIOWrapper(raw, encoding="utf-8")


def read_jsonl_zst(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream the JSON objects of a zstd-compressed JSONL file, one line at a time."""
    for _, record in iter_jsonl_records(Path(path)):
        yield record


def iter_jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("line N", object) for each non-blank line of a .jsonl or .jsonl.zst file, streamed."""
    with open_text(path) as lines:
        try:
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    yield f"line {lineno}", _parse_record(path, f"line {lineno}", line)
        except (UnicodeDecodeError, zstandard.ZstdError) as exc:
            raise RanklensError(
                f"cannot read corpus file {str(path)!r}: {exc}; expected UTF-8 JSON lines"
                f"{' compressed with zstd' if _is_zst(path) else ''}"
            ) from exc


def _parse_record(path: Path, where: str, line: str) -> dict[str, Any]:
    """One JSONL record; ``where`` ("line 12", "at byte 4096") places it in error messages."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RanklensError(
            f"{str(path)!r} {where} is not valid JSON ({exc.msg}): expected one JSON "
            f"object per line with a string field {TEXT_FIELD!r}"
        ) from exc
    if not isinstance(record, dict):
        raise RanklensError(
            f"{str(path)!r} {where} is a JSON {type(record).__name__}: expected one JSON object per line with a "
            f"string field {TEXT_FIELD!r}"
        )
    return record


def _field_of(names: Iterable[str], field: str | None, where: str) -> str:
    """The field a record or table is read from: `field` if given, else ``text``, else ``input_ids``."""
    names = list(names)
    if field is not None:
        if field not in names:
            raise RanklensError(f"{where} has no field {field!r} (found {sorted(names)}): expected the field "
                                "named by --text-field / SPEC#FIELD")
        return field
    for candidate in (TEXT_FIELD, TOKENS_FIELD):
        if candidate in names:
            return candidate
    raise RanklensError(f"{where} has no {TEXT_FIELD!r} field (found {sorted(names)}): expected a string field "
                        f"{TEXT_FIELD!r}, a token-id field {TOKENS_FIELD!r}, or choose one with --text-field")


def _document_value(value: Any, where: str, field: str) -> Document | None:
    """A record's document: a string (text) or a list of integers (token ids, pre-tokenized); None if missing."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy / arrow arrays of ids
        return _document_value(value.tolist(), where, field)
    raise RanklensError(f"{where}: field {field!r} holds {type(value).__name__}, expected a string or a list of "
                        "token ids")


def _texts_of_records(path: Path, records: Iterable[tuple[str, dict[str, Any]]],
                      field: str | None) -> Iterator[Document]:
    for where, record in records:
        where = f"{str(path)!r} {where}"
        key = _field_of(record, field, where)
        text = _document_value(record[key], where, key)
        if text is not None:
            yield text


def _read_txt(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RanklensError(
            f"corpus file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    nul = text.find("\x00")
    if nul >= 0:  # valid UTF-8 but binary: no text holds NUL characters
        raise RanklensError(f"corpus file {str(path)!r} holds a NUL byte at character {nul}; expected text, not a "
                            "binary file")
    return text


def _txt_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*.txt") if p.is_file())
    if not files:
        raise RanklensError(
            f"corpus directory {str(directory)!r} holds no .txt files: expected {ACCEPTED_FILES}"
        )
    return files


def _jsonl_line_offsets(path: Path) -> array:
    """Byte offsets of the non-blank lines of a .jsonl file: 8 bytes a document, for a full shuffle."""
    offsets = array("q")
    position = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                offsets.append(position)
            position += len(line)
    return offsets


def _jsonl_shuffled(path: Path, rng: random.Random, field: str | None) -> Iterator[Document]:
    offsets = _jsonl_line_offsets(path)
    order = list(range(len(offsets)))
    _shuffle(order, rng)
    with path.open("rb") as f:
        for index in order:
            f.seek(offsets[index])
            line = f.readline()
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RanklensError(
                    f"corpus file {str(path)!r} is not UTF-8 ({exc.reason}): expected UTF-8 JSON lines"
                ) from exc
            where = f"at byte {offsets[index]}"  # line numbers are not tracked in this order
            yield from _texts_of_records(path, [(where, _parse_record(path, where, decoded))], field)


def _parquet_file(path: Path, field: str | None = None):  # noqa: ANN202 - (ParquetFile, its document column)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RanklensError(f"cannot read corpus file {str(path)!r} as parquet: {exc}") from exc
    schema = parquet.schema_arrow
    column = _field_of(schema.names, field, f"parquet file {str(path)!r}")
    column_type = schema.field(column).type
    is_text = pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
    is_ids = pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
    if is_ids:
        is_ids = pa.types.is_integer(column_type.value_type)
    if not (is_text or is_ids):
        raise RanklensError(
            f"parquet file {str(path)!r}: column {column!r} has type {column_type}, "
            "expected a string column or a list of token ids"
        )
    return parquet, column


def _parquet_texts(path: Path, rng: random.Random | None, field: str | None,
                   batch_rows: int = 1024) -> Iterator[Document]:
    """Documents of a parquet file, one row group at a time (only the document column is read)."""
    parquet, column = _parquet_file(path, field)
    groups = list(range(parquet.num_row_groups))
    if rng is not None:
        _shuffle(groups, rng)
    for group in groups:
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=[column]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text


# --------------------------------------------------------------------------------------------------------------
# Shuffling
# --------------------------------------------------------------------------------------------------------------
def _shuffle(items: list[Any], rng: random.Random) -> None:
    """Fisher-Yates on ``rng.random()`` alone, the one draw whose sequence Python promises to keep per seed."""
    for i in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        items[i], items[j] = items[j], items[i]


def _buffer_shuffle(items: Iterable[str], rng: random.Random, size: int) -> Iterator[str]:
    """Seeded shuffle buffer (App. E.2): emit a random element of a full buffer and put the next item there."""
    buffer: list[str] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.random() * size)
        yield buffer[j]
        buffer[j] = item
    _shuffle(buffer, rng)
    yield from buffer


# --------------------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusSpec:
    """A parsed corpus spec. ``kind``: embedded, txt, txt_dir, jsonl, jsonl.zst, parquet or hf."""

    spec: str
    kind: str
    name: str
    subsets: tuple[str, ...] = ()
    path: Path | None = None
    hf_config: str | None = None
    hf_split: str = HF_DEFAULT_SPLIT
    field: str | None = None  # SPEC#FIELD: the record field documents are read from (None: text, else input_ids)
    long_documents: str = "auto"  # a "split:" or "truncate:" prefix

    @property
    def splits(self) -> bool:
        """Whether documents longer than the context are split into contexts (else truncated, App. E.2): asked
        for with ``split:``, or by default for a single .txt file, which is one document."""
        return self.long_documents == "split" or (self.long_documents == "auto" and self.kind == "txt")


def _unknown(spec: str) -> RanklensError:
    names = ", ".join(embedded_names()) or "none installed"
    bad = [p for p in spec.split("+") if p.strip() not in embedded_names()] if "+" in spec else []
    which = f" ({', '.join(map(repr, bad))} is not an embedded corpus)" if bad else ""
    return RanklensError(
        f"unknown corpus {spec!r}{which}: expected an embedded corpus ({names}, or several "
        f"joined with '+'), a path to {ACCEPTED_FILES}, or hf:NAME[:CONFIG][:SPLIT]"
    )


def _local_kind(path: Path) -> str | None:
    if path.is_dir():
        return "txt_dir"
    name = path.name.lower()
    return next(
        (
            suffix.lstrip(".")
            for suffix in sorted(LOCAL_SUFFIXES, key=len, reverse=True)
            if name.endswith(suffix)
        ),
        None,
    )


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.startswith((".", "~")) or bool(Path(spec).suffix)


def _parse_embedded(spec: str) -> CorpusSpec | None:
    parts = [p.strip() for p in spec.split("+")]
    if not EMBEDDED_SUBSETS or not all(p in embedded_names() for p in parts):
        return None
    chosen = set(EMBEDDED_SUBSETS) if DEFAULT_CORPUS in parts else set(parts)
    # canonical order (the manifest's), so "code+prose" and "prose+code" are one corpus with one order
    subsets = tuple(s for s in EMBEDDED_SUBSETS if s in chosen)
    name = DEFAULT_CORPUS if subsets == EMBEDDED_SUBSETS else "+".join(subsets)
    return CorpusSpec(spec=spec, kind="embedded", name=name, subsets=subsets)


def _parse_hf(spec: str) -> CorpusSpec:
    rest = spec[len(HF_PREFIX) :]
    if not rest.strip(":"):
        raise RanklensError(
            f"corpus {spec!r} names no dataset: expected hf:NAME[:CONFIG][:SPLIT] or hf:PATH[:SPLIT]"
        )
    parts = rest.split(":")
    # a local directory may itself contain ':'; take the longest prefix that exists
    for k in range(len(parts), 0, -1):
        candidate = Path(":".join(parts[:k])).expanduser()
        if candidate.exists():
            extra = parts[k:]
            if len(extra) > 1 or not candidate.is_dir():
                raise RanklensError(
                    f"corpus {spec!r}: expected hf:DIRECTORY[:SPLIT] with a dataset directory"
                )
            split = extra[0] if extra and extra[0] else HF_DEFAULT_SPLIT
            return CorpusSpec(spec=spec, kind="hf", name=str(candidate), path=candidate, hf_split=split)
    if len(parts) > 3 or not parts[0]:
        raise RanklensError(f"corpus {spec!r}: expected hf:NAME[:CONFIG][:SPLIT]")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else HF_DEFAULT_SPLIT
    return CorpusSpec(spec=spec, kind="hf", name=parts[0], hf_config=config, hf_split=split)


def parse_spec(spec: str) -> CorpusSpec:
    """Classify and validate a corpus spec (see the module docstring); raises RanklensError when it is bad."""
    if not isinstance(spec, str) or not spec.strip():
        raise _unknown(str(spec))
    spec = spec.strip()
    for treatment in LONG_DOCUMENTS[1:]:
        if spec.startswith(treatment + ":"):
            return dataclasses.replace(parse_spec(spec[len(treatment) + 1:]), spec=spec, long_documents=treatment)
    if FIELD_SEPARATOR in spec.rsplit("/", 1)[-1]:
        base, field = spec.rsplit(FIELD_SEPARATOR, 1)
        if not field or not base:
            raise RanklensError(f"corpus {spec!r}: expected SPEC#FIELD with a field name after '#'")
        parsed = parse_spec(base)
        if parsed.kind not in ("jsonl", "jsonl.zst", "parquet", "hf"):
            raise RanklensError(f"corpus {spec!r}: a field applies to .jsonl, .jsonl.zst, .parquet and hf: "
                                f"corpora, not to {parsed.kind} corpora")
        return dataclasses.replace(parsed, spec=spec, field=field)
    if spec.startswith(HF_PREFIX):
        return _parse_hf(spec)
    embedded = _parse_embedded(spec)
    if embedded is not None:
        return embedded
    if spec == DEFAULT_CORPUS:
        load_manifest()  # without the package data: raises the "manifest missing" error
    path = Path(spec).expanduser()
    if path.exists():
        kind = _local_kind(path)
        if kind is None:
            raise RanklensError(f"unsupported corpus file {spec!r}: expected {ACCEPTED_FILES}")
        return CorpusSpec(spec=spec, kind=kind, name=path.name, path=path)
    if _looks_like_path(spec):
        if _local_kind(path) is None and path.suffix:
            raise RanklensError(f"unsupported corpus file {spec!r}: expected {ACCEPTED_FILES}")
        raise RanklensError(
            f"corpus file not found: {spec!r} (expected an existing path to {ACCEPTED_FILES})"
        )
    raise _unknown(spec)


# --------------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------------------------
def _import_datasets():  # noqa: ANN202 - the datasets module
    try:
        import datasets
    except ImportError as exc:
        raise RanklensError(
            "hf: corpora need the Hugging Face `datasets` package, which is not installed: "
            "pip install 'ranklens[hf]'"
        ) from exc
    return datasets


def _is_saved_dataset(directory: Path) -> bool:
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def _hf_dataset(parsed: CorpusSpec, seed: int | None, shuffle_buffer: int):  # noqa: ANN202
    datasets = _import_datasets()
    where = f"Hugging Face dataset {parsed.name!r} (config {parsed.hf_config!r}, split {parsed.hf_split!r})"
    try:
        if parsed.path is not None and _is_saved_dataset(parsed.path):
            dataset = datasets.load_from_disk(str(parsed.path))
            if isinstance(dataset, datasets.DatasetDict):
                if parsed.hf_split not in dataset:
                    raise RanklensError(f"{where}: no split {parsed.hf_split!r}; it has {sorted(dataset)}")
                dataset = dataset[parsed.hf_split]
            return dataset.shuffle(seed=seed) if seed is not None else dataset
        source = str(parsed.path) if parsed.path is not None else parsed.name
        dataset = datasets.load_dataset(source, parsed.hf_config, split=parsed.hf_split, streaming=True)
    except RanklensError:
        raise
    except Exception as exc:  # any failure to resolve user input (not found, offline, bad config...)
        raise RanklensError(f"cannot load {where}: {type(exc).__name__}: {exc}") from exc
    return dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if seed is not None else dataset


def _hf_texts(parsed: CorpusSpec, seed: int | None, shuffle_buffer: int) -> Iterator[Document]:
    dataset = _hf_dataset(parsed, seed, shuffle_buffer)
    where = f"Hugging Face dataset {parsed.name!r}"
    columns = dataset.column_names
    column = _field_of(columns, parsed.field, where) if columns is not None else None
    for row in dataset:
        key = column or _field_of(row, parsed.field, where)
        if key not in row:
            _field_of(row, key, where)  # raises, naming the columns the row has
        text = _document_value(row[key], where, key)
        if text is not None:
            yield text


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
def _raw_documents(parsed: CorpusSpec, seed: int | None, shuffle_buffer: int) -> Iterator[Document]:
    rng = random.Random(seed) if seed is not None else None
    path = parsed.path
    if parsed.kind == "embedded":
        docs = [d for subset in parsed.subsets for d in _embedded_documents(subset)]
        if rng is not None:
            _shuffle(docs, rng)
        return iter(docs)
    if parsed.kind == "hf":
        return _hf_texts(parsed, seed, shuffle_buffer)
    assert path is not None
    if parsed.kind == "txt":
        return iter([_read_txt(path)])
    if parsed.kind == "txt_dir":
        files = _txt_files(path)
        if rng is not None:
            _shuffle(files, rng)
        return (_read_txt(f) for f in files)
    if parsed.kind == "jsonl":
        if rng is not None:
            return _jsonl_shuffled(path, rng, parsed.field)
        return _texts_of_records(path, iter_jsonl_records(path), parsed.field)
    if parsed.kind == "jsonl.zst":
        texts = _texts_of_records(path, iter_jsonl_records(path), parsed.field)
        return _buffer_shuffle(texts, rng, shuffle_buffer) if rng is not None else texts
    if parsed.kind == "parquet":
        texts = _parquet_texts(path, rng, parsed.field)
        return _buffer_shuffle(texts, rng, shuffle_buffer) if rng is not None else texts
    raise AssertionError(f"unhandled corpus kind {parsed.kind}")


def _check_eagerly(parsed: CorpusSpec) -> None:
    """Fail at call time, not at the first ``next()``, for the errors one look at the input reveals."""
    if parsed.kind == "embedded":
        for subset in parsed.subsets:
            _embedded_documents(subset)
    elif parsed.kind == "txt_dir":
        assert parsed.path is not None
        _txt_files(parsed.path)
    elif parsed.kind == "parquet":
        assert parsed.path is not None
        _parquet_file(parsed.path, parsed.field)
    elif parsed.kind in ("jsonl", "jsonl.zst"):
        assert parsed.path is not None
        with contextlib.closing(iter_jsonl_records(parsed.path)) as records:
            first = next(records, None)  # the first record must parse and carry the document field
            if first is not None:
                _field_of(first[1], parsed.field, f"{str(parsed.path)!r} {first[0]}")
    elif parsed.kind == "hf":
        _import_datasets()


def _non_empty(docs: Iterable[Document], spec: str) -> Iterator[Document]:
    count = 0
    for doc in docs:
        if doc if isinstance(doc, list) else doc.strip():
            count += 1
            yield doc
    if count == 0:
        raise RanklensError(f"corpus {spec!r} is empty: expected at least one document that is not blank")


def splits_documents(spec: str) -> bool:
    """Whether the documents of `spec` are split into contexts rather than truncated to one (see above)."""
    return parse_spec(spec).splits


def iter_documents(
    spec: str, seed: int | None = 0, *, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
) -> Iterator[Document]:
    """The documents of a corpus, in a deterministic order given ``seed`` (see the module docstring).

    Bad specs (unknown name, missing file, unsupported type, no ``text`` field) raise RanklensError here;
    an empty corpus raises it when the iterator is exhausted without having yielded a document.
    """
    if shuffle_buffer < 1:
        raise RanklensError(f"shuffle_buffer must be a positive number of documents, got {shuffle_buffer}")
    parsed = parse_spec(spec)
    _check_eagerly(parsed)
    return _non_empty(_raw_documents(parsed, seed, shuffle_buffer), spec)


def _directory_sha256(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def describe_corpus(spec: str, *, hash_files: bool = True) -> dict[str, Any]:
    """What a run manifest records about a corpus: name, kind, path and sha256 (files), n_documents if known.

    ``hash_files=False`` skips hashing local files (sha256 is then None), for very large corpora.
    """
    parsed = parse_spec(spec)
    info: dict[str, Any] = {
        "spec": spec,
        "name": parsed.name,
        "kind": parsed.kind,
        "path": None,
        "sha256": None,
        "n_documents": None,
    }
    if parsed.kind == "embedded":
        manifest = load_manifest()
        subsets = {s: manifest["subsets"][s] for s in parsed.subsets}
        info.update(
            subsets=list(parsed.subsets),
            files={s: {"file": e["file"], "sha256": e["sha256"]} for s, e in subsets.items()},
            n_documents=sum(e["n_documents"] for e in subsets.values()),
            n_tokens=sum(e["n_tokens"] for e in subsets.values()),
            tokenizer=manifest.get("tokenizer", {}).get("name"),
        )
        return info
    if parsed.kind == "hf":
        info.update(
            config=parsed.hf_config,
            split=parsed.hf_split,
            path=str(parsed.path.resolve()) if parsed.path is not None else None,
        )
        return info
    assert parsed.path is not None
    path = parsed.path.resolve()
    info["path"] = str(path)
    if parsed.kind == "txt_dir":
        files = _txt_files(path)
        info.update(n_files=len(files), sha256=_directory_sha256(files, path) if hash_files else None)
        return info
    info["sha256"] = sha256_file(path) if hash_files else None
    if parsed.kind == "txt":
        info["n_documents"] = 1
    elif parsed.kind == "parquet":
        info["n_rows"] = _parquet_file(path, parsed.field)[0].metadata.num_rows  # blank texts are skipped, so an upper bound
    return info


@dataclass(frozen=True)
class HeldOutSource:
    """Which text is held out: the documents of `corpus` (in its `seed` order) from `start_doc` on."""

    corpus: str
    seed: int
    start_doc: int
    context_length: int

    def documents(self) -> Iterator[Document]:
        return itertools.islice(iter_documents(self.corpus, seed=self.seed), self.start_doc, None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> HeldOutSource:
        return cls(str(record["corpus"]), int(record["seed"]), int(record["start_doc"]),
                   int(record["context_length"]))
