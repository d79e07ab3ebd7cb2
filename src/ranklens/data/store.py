"""The activation store on disk: sharded safetensors plus a JSON manifest, resumable, with two readers.

Layout of a store directory::

    manifest.json                  format, format_version, meta (model, corpus, seed, context_length, code_version,
                                   ...), sites {name: {d}}, dtype, shard_tokens, complete, totals (n_shards,
                                   n_sequences, n_positions, n_tokens, docs_consumed) and per shard: file,
                                   n_sequences, n_positions, n_tokens, bytes, sha256, docs_consumed (cumulative)
    shard-000000.safetensors       one tensor per site [n_positions, d] (store dtype), input_ids [n_positions] int32,
    shard-000001.safetensors       stat_mask [n_positions] bool, seq_offsets [n_sequences + 1] int64;
    ...                            safetensors metadata {"format_version": "1"}
    .lock                          flock-ed by the one live writer (stale and harmless otherwise)

The collector feeds whole sequences (documents truncated to the context length, bos at position 0 where the model has
one). Every real position of a sequence is stored (bos included, padding never), so the sequence reader can give Lorsa
the attention input at every position. ``stat_mask`` marks the positions that count as tokens for statistics and
training (False for bos/eos/pad); the token reader yields only those, and every ``n_tokens`` counts only those.

Crash safety: a shard is written under a temporary name in the same directory, fsynced and renamed
(``ranklens.io.atomic_path``); then the manifest is written the same way. The manifest therefore lists only complete shards, and the ``docs_consumed`` of its last shard
says where the collector resumes. Sequences still buffered in memory when a writer dies are not on disk and are
collected again on resume (at most one shard's worth). On resume, temporaries (ours, and the ``.tmpXXXXXX`` that
safetensors' ``save_file`` writes through) and shards the manifest does not list are removed.

Shard boundaries fall at the first batch boundary where the buffered stat tokens reach ``shard_tokens``; the buffer
starts empty after each shard. So a resumed run that feeds the same batches from ``docs_consumed`` on (a collector
whose batches are a function of the document index) writes byte-identical shards to an uninterrupted run, and the
token reader then gives the same batches for the same seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ranklens.data.corpus import HeldOutSource
from ranklens.errors import RanklensError
from ranklens.io import atomic_path, atomic_write_text
from ranklens.lock import LOCK_NAME, DirectoryLock

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "REQUIRED_META",
    "ActivationStore",
    "ActivationStoreWriter",
    "SequenceBatch",
    "ShardInfo",
]

FORMAT = "ranklens-activation-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_META = ("model", "corpus", "seed", "context_length", "code_version")
DEFAULT_SHARD_TOKENS = 65_536
# Tensor names in a shard besides the sites; a site may not take one of them.
RESERVED_KEYS = ("input_ids", "stat_mask", "seq_offsets")

_SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_HASH_CHUNK = 8 << 20
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


# Ours (".<name>.<random>.tmp", ranklens.io) and safetensors' own: save_file writes through a tempfile-crate NamedTempFile (".tmpXXXXXX")
# in the target's directory before renaming it to our temporary name.
_TMP_RE = re.compile(r"^(\..+\.tmp|\.tmp[A-Za-z0-9_-]+)$")


def _is_tmp(name: str) -> bool:
    return _TMP_RE.match(name) is not None


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in _DTYPES:
            return name
    else:
        for name, dt in _DTYPES.items():
            if dtype is dt:
                return name
    raise RanklensError(f"store dtype {dtype!r} is not supported; expected one of {', '.join(_DTYPES)}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _json_normalize(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise RanklensError(
            f"{what} must be JSON-serializable (str/int/float/bool/None/list/dict): {e}"
        ) from None


# --------------------------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard as listed in the manifest."""

    file: str
    n_sequences: int
    n_positions: int  # all stored positions (bos included, padding never)
    n_tokens: int  # positions with stat_mask True
    bytes: int
    sha256: str
    docs_consumed: int  # cumulative documents consumed from the corpus once this shard is stored

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "n_sequences": self.n_sequences,
            "n_positions": self.n_positions,
            "n_tokens": self.n_tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "docs_consumed": self.docs_consumed,
        }


@dataclass
class _Manifest:
    meta: dict[str, Any]
    sites: dict[str, int]
    dtype: str
    shard_tokens: int
    shards: list[ShardInfo]
    complete: bool
    docs_consumed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "meta": self.meta,
            "sites": {site: {"d": d} for site, d in self.sites.items()},
            "dtype": self.dtype,
            "shard_tokens": self.shard_tokens,
            "complete": self.complete,
            "n_shards": len(self.shards),
            "n_sequences": sum(s.n_sequences for s in self.shards),
            "n_positions": sum(s.n_positions for s in self.shards),
            "n_tokens": sum(s.n_tokens for s in self.shards),
            "docs_consumed": self.docs_consumed,
            "shards": [s.to_json() for s in self.shards],
        }

    def write(self, directory: Path) -> None:
        atomic_write_text(directory / MANIFEST_NAME, json.dumps(self.to_json(), indent=2) + "\n")


def _read_manifest(directory: Path) -> _Manifest:
    path = directory / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RanklensError(f"{path} not found; expected an activation store directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RanklensError(f"{path} is not a readable JSON manifest: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise RanklensError(f"{path} has format {got!r}; expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise RanklensError(
            f"{path} has format_version {raw.get('format_version')!r}; this ranklens reads {FORMAT_VERSION}"
        )
    try:
        shards = [
            ShardInfo(
                file=str(s["file"]),
                n_sequences=int(s["n_sequences"]),
                n_positions=int(s["n_positions"]),
                n_tokens=int(s["n_tokens"]),
                bytes=int(s["bytes"]),
                sha256=str(s["sha256"]),
                docs_consumed=int(s["docs_consumed"]),
            )
            for s in raw["shards"]
        ]
        man = _Manifest(
            meta=dict(raw["meta"]),
            sites={str(k): int(v["d"]) for k, v in raw["sites"].items()},
            dtype=str(raw["dtype"]),
            shard_tokens=int(raw["shard_tokens"]),
            shards=shards,
            complete=bool(raw["complete"]),
            docs_consumed=int(raw["docs_consumed"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RanklensError(
            f"{path} is malformed ({type(e).__name__}: {e}); expected a ranklens store manifest"
        ) from None
    if man.dtype not in _DTYPES:
        raise RanklensError(f"{path} has dtype {man.dtype!r}; expected one of {', '.join(_DTYPES)}")
    merged = int(man.meta.get("world_size", 1)) > 1 and "rank" not in man.meta  # the manifest over rank stores
    for i, s in enumerate(shards):
        ok = re.fullmatch(r"rank-\d+/shard-\d{6}\.safetensors", s.file) if merged else s.file == _shard_name(i)
        if not ok:
            raise RanklensError(f"{path} lists shard {i} as {s.file!r}; expected {_shard_name(i)!r}")
    return man


def rank_dir(directory: str | Path, rank: int) -> Path:
    """Where rank ``rank`` of a multi-rank collection writes its own store (its shards and manifest)."""
    return Path(directory) / f"rank-{rank}"


def merge_rank_stores(directory: str | Path, world_size: int) -> None:
    """Write the one manifest of a store collected by ``world_size`` ranks: every rank's complete shards (by rank,
    then in order; files ``rank-R/shard-N``), and the documents consumed by the furthest rank (where held-out text
    begins). Any later job reads the result as one store."""
    directory = Path(directory)
    parts = [_read_manifest(rank_dir(directory, r)) for r in range(world_size)]
    if not all(p.complete for p in parts):
        raise RanklensError(f"{directory}: rank stores {[r for r, p in enumerate(parts) if not p.complete]} are not "
                            "complete; rerun the collection with the same world size")
    meta = {k: v for k, v in parts[0].meta.items() if k != "rank"}
    shards = [ShardInfo(**{**s.to_json(), "file": f"rank-{r}/{s.file}"}) for r, p in enumerate(parts)
              for s in p.shards]
    _Manifest(meta=meta, sites=parts[0].sites, dtype=parts[0].dtype, shard_tokens=parts[0].shard_tokens,
              shards=shards, complete=True, docs_consumed=max(p.docs_consumed for p in parts)).write(directory)


def _check_shard_files(directory: Path, shards: Sequence[ShardInfo]) -> None:
    """Cheap check (existence and size) of every listed shard."""
    for s in shards:
        path = directory / s.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise RanklensError(f"shard {path} is listed in the manifest but missing") from None
        if size != s.bytes:
            raise RanklensError(
                f"shard {path} has {size} bytes; the manifest expects {s.bytes} (truncated or overwritten)"
            )


# --------------------------------------------------------------------------------------------------------------
# Writer


def _validate_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise RanklensError(f"store meta must be a dict; got {type(meta).__name__}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise RanklensError(
            f"store meta lacks {', '.join(missing)}; expected keys {', '.join(REQUIRED_META)}"
        )
    return _json_normalize(dict(meta), "store meta")


def _validate_sites(sites: Any) -> dict[str, int]:
    if not isinstance(sites, Mapping) or not sites:
        raise RanklensError(f"sites must be a non-empty dict of site name -> d; got {sites!r}")
    out: dict[str, int] = {}
    for site, d in sites.items():
        if not isinstance(site, str) or not site or site in RESERVED_KEYS:
            raise RanklensError(
                f"site name {site!r} is not allowed; expected a non-empty str other than {RESERVED_KEYS}"
            )
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise RanklensError(f"sites[{site!r}] = {d!r}; expected a positive int (the activation width d)")
        out[site] = d
    return out


def _describe_mismatch(man: _Manifest, meta: dict[str, Any], sites: dict[str, int], dtype: str) -> list[str]:
    diffs: list[str] = []
    for key in sorted(set(man.meta) | set(meta)):
        if man.meta.get(key, "<absent>") != meta.get(key, "<absent>"):
            diffs.append(
                f"meta[{key!r}] is {man.meta.get(key, '<absent>')!r} there, {meta.get(key, '<absent>')!r} requested"
            )
    if man.sites != sites:
        diffs.append(f"sites are {man.sites} there, {sites} requested")
    if man.dtype != dtype:
        diffs.append(f"dtype is {man.dtype} there, {dtype} requested")
    return diffs


class _ManifestView:
    """Read-only views of the manifest, shared by the writer and the reader (both keep it in `self._man`)."""

    _man: _Manifest

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._man.meta)

    @property
    def sites(self) -> dict[str, int]:
        return dict(self._man.sites)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self._man.dtype]

    @property
    def complete(self) -> bool:
        return self._man.complete

    @property
    def shard_tokens(self) -> int:
        return self._man.shard_tokens

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return tuple(self._man.shards)

    @property
    def docs_consumed(self) -> int:
        """Documents consumed by what is durably on disk (where a resumed collector starts)."""
        return self._man.docs_consumed

    def held_out(self) -> HeldOutSource:
        """The documents after those the store holds (text a dictionary trained on it never saw)."""
        m = self._man.meta
        return HeldOutSource(m["corpus"], int(m["seed"]), self.docs_consumed, int(m["context_length"]))

    @property
    def n_positions(self) -> int:
        return sum(s.n_positions for s in self._man.shards)


@dataclass
class _Pending:
    acts: dict[str, torch.Tensor]  # site -> [n_positions, d], store dtype, CPU
    input_ids: torch.Tensor  # [n_positions] int32
    stat_mask: torch.Tensor  # [n_positions] bool
    lengths: torch.Tensor  # [B] int64


class ActivationStoreWriter(_ManifestView):
    """Appends whole sequences to a store directory; creates it or resumes it (see `open`).

    ``docs_consumed`` / ``n_tokens`` report what is durably on disk: a collector that resumes skips exactly
    ``docs_consumed`` documents of its corpus and feeds the rest. Closing a writer (or losing it) without `finish`
    drops the sequences still buffered in memory; they are collected again on resume.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        meta: Mapping[str, Any],
        sites: Mapping[str, int],
        dtype: torch.dtype | str,
        shard_tokens: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        meta_n = _validate_meta(meta)
        sites_n = _validate_sites(sites)
        dtype_n = _dtype_name(dtype)
        if shard_tokens is not None and (
            isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1
        ):
            raise RanklensError(f"shard_tokens = {shard_tokens!r}; expected a positive int")
        self._lock_file: Any = None
        self._closed = False
        self._buf: list[_Pending] = []
        self._buf_tokens = 0
        self._buf_sequences = 0

        d = self.directory
        if d.exists() and not d.is_dir():
            raise RanklensError(f"activation store path {d} is a file; expected a directory")
        self._scan(d)  # raises on unrelated files before anything is created
        d.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            if (d / MANIFEST_NAME).exists():
                man = _read_manifest(d)
                diffs = _describe_mismatch(man, meta_n, sites_n, dtype_n)
                if diffs:
                    raise RanklensError(f"{d / MANIFEST_NAME} holds a different run: {'; '.join(diffs[:3])}")
                if shard_tokens is not None and shard_tokens != man.shard_tokens:
                    raise RanklensError(
                        f"shard_tokens = {shard_tokens} differs from the store's {man.shard_tokens} in {d}; "
                        "resume with the same value (or omit it)"
                    )
                self._cleanup(d, keep={s.file for s in man.shards})
                _check_shard_files(d, man.shards)
            else:
                names = self._scan(d)
                if names["shards"]:
                    raise RanklensError(
                        f"{d} holds {names['shards'][0]} but no {MANIFEST_NAME}; expected an empty directory or a store"
                    )
                self._cleanup(d, keep=set())
                man = _Manifest(
                    meta=meta_n,
                    sites=sites_n,
                    dtype=dtype_n,
                    shard_tokens=shard_tokens if shard_tokens is not None else DEFAULT_SHARD_TOKENS,
                    shards=[],
                    complete=False,
                    docs_consumed=0,
                )
                man.write(d)
        except BaseException:
            self._release_lock()
            raise
        self._man = man
        self._pending_docs = man.docs_consumed
        if man.complete:
            self._release_lock()  # nothing will be written

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        meta: Mapping[str, Any],
        sites: Mapping[str, int],
        dtype: torch.dtype | str,
        shard_tokens: int | None = None,
    ) -> ActivationStoreWriter:
        """Create a new store, resume an incomplete one written with the same meta/sites/dtype, or return a complete
        one as complete (``writer.complete``; nothing to do). Raises RanklensError if the directory holds another
        run or unrelated files. ``shard_tokens`` defaults to 65,536 for a new store and to the store's value on resume.
        """
        return cls(directory, meta, sites, dtype, shard_tokens)

    # -- directory handling -----------------------------------------------------------------------------------

    @staticmethod
    def _scan(d: Path) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"shards": [], "tmp": []}
        if not d.exists():
            return out
        for entry in sorted(d.iterdir(), key=lambda p: p.name):
            name = entry.name
            if name in (MANIFEST_NAME, LOCK_NAME) and entry.is_file():
                continue
            if _SHARD_RE.match(name) and entry.is_file():
                out["shards"].append(name)
            elif _is_tmp(name) and entry.is_file():
                out["tmp"].append(name)
            else:
                raise RanklensError(
                    f"{d} holds {name!r}, which is not part of an activation store; "
                    f"expected an empty directory or a store ({MANIFEST_NAME} + shard-*.safetensors)"
                )
        return out

    def _cleanup(self, d: Path, keep: set[str]) -> None:
        """Remove temporaries and shards the manifest does not list (left by a run killed mid-write)."""
        names = self._scan(d)
        for name in names["tmp"] + [n for n in names["shards"] if n not in keep]:
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()

    def _acquire_lock(self) -> None:
        self._lock_file = DirectoryLock(self.directory, "activation store").acquire()

    def _release_lock(self) -> None:
        lock, self._lock_file = self._lock_file, None
        if lock is not None:
            lock.release()

    # -- state ------------------------------------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        """Stat tokens durably on disk."""
        return sum(s.n_tokens for s in self._man.shards)

    @property
    def n_sequences(self) -> int:
        return sum(s.n_sequences for s in self._man.shards)

    @property
    def buffered_tokens(self) -> int:
        """Stat tokens added but not yet on disk."""
        return self._buf_tokens

    # -- writing ----------------------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._man.complete:
            raise RanklensError(
                f"activation store {self.directory} is complete; open a new directory to collect more"
            )
        if self._closed:
            raise RanklensError(f"writer for {self.directory} is closed; open it again to resume")

    def add(
        self,
        acts: Mapping[str, torch.Tensor],
        lengths: torch.Tensor,
        stat_mask: torch.Tensor,
        input_ids: torch.Tensor,
        docs_consumed: int,
    ) -> None:
        """Append a batch of right-padded sequences.

        acts: site -> [B, T, d]; lengths: [B] real length of each row (>= 1); stat_mask: [B, T] bool (False at
        bos/eos/pad, and necessarily False beyond a row's length); input_ids: [B, T]; docs_consumed: cumulative
        documents consumed from the corpus after this batch (non-decreasing).
        Flushes a shard once the buffered stat tokens reach ``shard_tokens``.
        """
        self._check_writable()
        sites = self._man.sites
        if set(acts) != set(sites):
            missing = sorted(set(sites) - set(acts))
            extra = sorted(set(acts) - set(sites))
            raise RanklensError(
                f"acts has sites missing {missing} / unexpected {extra}; expected exactly {sorted(sites)}"
            )
        if not isinstance(stat_mask, torch.Tensor) or stat_mask.dim() != 2 or stat_mask.dtype != torch.bool:
            raise RanklensError(f"stat_mask must be a bool tensor [B, T]; got {_describe(stat_mask)}")
        B, T = stat_mask.shape
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.is_floating_point():
            raise RanklensError(f"lengths must be an integer tensor [{B}]; got {_describe(lengths)}")
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.shape != (B, T)
            or input_ids.is_floating_point()
            or input_ids.dtype == torch.bool
        ):
            raise RanklensError(f"input_ids must be an integer tensor [{B}, {T}]; got {_describe(input_ids)}")
        for site, x in acts.items():
            if not isinstance(x, torch.Tensor) or x.shape != (B, T, sites[site]):
                raise RanklensError(
                    f"acts[{site!r}] must be a tensor [{B}, {T}, {sites[site]}]; got {_describe(x)}"
                )
        try:
            docs = operator.index(docs_consumed)  # int, numpy or 0-d torch integers
        except TypeError:
            docs = -1
        if docs < self._pending_docs:
            raise RanklensError(
                f"docs_consumed = {docs_consumed!r}; expected an int >= {self._pending_docs} (the previous value)"
            )
        lengths = lengths.detach().to("cpu", torch.int64)
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise RanklensError(
                f"lengths range over [{int(lengths.min())}, {int(lengths.max())}]; expected 1..{T}"
            )
        valid = torch.arange(T)[None, :] < lengths[:, None]  # [B, T] real positions
        stat_cpu = stat_mask.detach().cpu()
        if bool((stat_cpu & ~valid).any()):
            raise RanklensError(
                "stat_mask is True at padded positions (beyond lengths); expected False there"
            )
        ids = input_ids.detach().cpu()[valid]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 2**31):
            raise RanklensError(
                f"input_ids range over [{int(ids.min())}, {int(ids.max())}]; expected 0..2**31-1"
            )
        dtype = self.dtype
        rows: dict[str, torch.Tensor] = {}
        for site, x in acts.items():
            r = x.detach()[valid.to(x.device)].to(dtype).cpu()  # [n_positions, d]
            if not bool(torch.isfinite(r.sum(dtype=torch.float32))):  # one reduction: NaN/inf propagate
                raise RanklensError(
                    f"the activations of site {site} hold NaN or inf (in {self._man.dtype}) at real positions; "
                    "the model's forward produced them (a float16 overflow? try --dtype float32)"
                )
            rows[site] = r
        stat = stat_cpu[valid]
        self._buf.append(_Pending(acts=rows, input_ids=ids.to(torch.int32), stat_mask=stat, lengths=lengths))
        self._buf_tokens += int(stat.sum())
        self._buf_sequences += B
        self._pending_docs = docs
        if self._buf_tokens >= self._man.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._buf_sequences:
            self._buf.clear()
            return
        d = self.directory
        name = _shard_name(len(self._man.shards))
        lengths = torch.cat([p.lengths for p in self._buf])
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        tensors = {
            site: torch.cat([p.acts[site] for p in self._buf]).contiguous() for site in self._man.sites
        }
        tensors["input_ids"] = torch.cat([p.input_ids for p in self._buf])
        tensors["stat_mask"] = torch.cat([p.stat_mask for p in self._buf])
        tensors["seq_offsets"] = offsets
        n_positions = int(offsets[-1])
        n_tokens = int(tensors["stat_mask"].sum())
        # One metadata key only: safetensors writes metadata from a hash map in random order, and shard bytes
        # (hence their sha256) must not depend on it.
        with atomic_path(d / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
            size = tmp.stat().st_size
            sha = _sha256_file(tmp)
        info = ShardInfo(
            file=name,
            n_sequences=len(lengths),
            n_positions=n_positions,
            n_tokens=n_tokens,
            bytes=size,
            sha256=sha,
            docs_consumed=self._pending_docs,
        )
        self._man.shards.append(info)
        self._man.docs_consumed = self._pending_docs
        self._man.write(d)
        self._buf.clear()
        self._buf_tokens = 0
        self._buf_sequences = 0

    def finish(self) -> ActivationStore:
        """Flush what is buffered, mark the store complete and release it; returns a reader. No-op if complete."""
        if not self._man.complete:
            self._check_writable()
            self._flush()
            self._man.complete = True
            self._man.docs_consumed = self._pending_docs
            self._man.write(self.directory)
            self.close()
        return ActivationStore(self.directory)

    def close(self) -> None:
        """Release the store without finishing it: buffered sequences are dropped; open() resumes later."""
        self._closed = True
        self._buf.clear()
        self._buf_tokens = 0
        self._buf_sequences = 0
        self._release_lock()

    def __enter__(self) -> ActivationStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release_lock()

    def __repr__(self) -> str:
        state = (
            "complete" if self.complete else f"{self.n_tokens} tokens on disk, {self._buf_tokens} buffered"
        )
        return f"ActivationStoreWriter({str(self.directory)!r}, {state})"


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)}"
    return type(x).__name__


# --------------------------------------------------------------------------------------------------------------
# Readers


@dataclass
class SequenceBatch:
    """Whole sequences, right-padded to the longest in the batch."""

    acts: dict[str, torch.Tensor]  # site -> [B, T_max, d] (zeros at padding)
    input_ids: torch.Tensor  # [B, T_max] int64 (pad_id at padding)
    lengths: torch.Tensor  # [B] int64
    stat_mask: torch.Tensor  # [B, T_max] bool (False at padding)
    attention_mask: torch.Tensor  # [B, T_max] bool, True at real positions
    sequence_ids: torch.Tensor  # [B] int64, index of each sequence in storage order


class _OpenShard:
    """A shard opened for reading: the safetensors handle plus its small per-position tensors."""

    def __init__(self, path: Path, info: ShardInfo, sites: dict[str, int], dtype: torch.dtype) -> None:
        self.path = path
        self.info = info
        try:
            self.file = safe_open(str(path), framework="pt")
            keys = set(self.file.keys())
            self.stat_mask = self.file.get_tensor("stat_mask") if "stat_mask" in keys else None
            self.seq_offsets = self.file.get_tensor("seq_offsets") if "seq_offsets" in keys else None
            shapes = {
                k: (list(self.file.get_slice(k).get_shape()), self.file.get_slice(k).get_dtype())
                for k in keys
            }
            version = (self.file.metadata() or {}).get("format_version")
        except Exception as e:  # safetensors raises its own error type on corrupt headers
            raise RanklensError(f"shard {path} is not a readable safetensors file: {e}") from None
        if version != str(FORMAT_VERSION):
            raise RanklensError(
                f"shard {path} has format_version {version!r}; expected {str(FORMAT_VERSION)!r}"
            )
        n, s = info.n_positions, info.n_sequences
        st_dt = _SAFETENSORS_DTYPES[dtype]
        expected = {site: ([n, dd], st_dt) for site, dd in sites.items()}
        expected["input_ids"] = ([n], "I32")
        expected["stat_mask"] = ([n], "BOOL")
        expected["seq_offsets"] = ([s + 1], "I64")
        if shapes != expected:
            raise RanklensError(f"shard {path} holds {shapes}; the manifest expects {expected}")
        assert self.stat_mask is not None and self.seq_offsets is not None
        offs = self.seq_offsets
        if int(offs[0]) != 0 or int(offs[-1]) != n or bool((offs[1:] <= offs[:-1]).any()):
            raise RanklensError(
                f"shard {path} has seq_offsets inconsistent with {n} positions in {s} sequences"
            )
        if int(self.stat_mask.sum()) != info.n_tokens:
            raise RanklensError(
                f"shard {path} has {int(self.stat_mask.sum())} stat tokens; the manifest expects {info.n_tokens}"
            )
        self._stat_positions: torch.Tensor | None = None

    @property
    def stat_positions(self) -> torch.Tensor:
        """[n_tokens] int64: position of each stat token."""
        if self._stat_positions is None:
            assert self.stat_mask is not None
            self._stat_positions = torch.nonzero(self.stat_mask).flatten()
        return self._stat_positions

    def get(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        try:
            if start is None:
                return self.file.get_tensor(key)
            return self.file.get_slice(key)[start:stop]
        except Exception as e:
            raise RanklensError(f"shard {self.path}: reading {key!r} failed: {e}") from None

    def stat_rows(self, site: str, r0: int, r1: int) -> torch.Tensor:
        """Stat tokens r0..r1 (in storage order) of a site: [r1 - r0, d]."""
        pos = self.stat_positions
        if r1 <= r0:
            return self.get(site, 0, 0)
        p0, p1 = int(pos[r0]), int(pos[r1 - 1]) + 1
        block = self.get(site, p0, p1)
        assert self.stat_mask is not None
        return block[self.stat_mask[p0:p1]]


class _TokenStream:
    """Stat-token ranges (shard, r0, r1) in the shard order of each epoch (shuffled with the shared generator)."""

    def __init__(self, counts: list[int], epochs: int | None, gen: torch.Generator) -> None:
        self.counts = counts
        self.total = sum(counts)
        self.epochs = epochs
        self.gen = gen
        self.epoch = -1
        self.order: list[int] = []
        self.pos = 0
        self.row = 0
        self.left_in_epoch = 0

    @property
    def exhausted(self) -> bool:
        if self.total == 0:
            return True
        return self.epochs is not None and self.left_in_epoch == 0 and self.epoch + 1 >= self.epochs

    def take(self, n: int) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        while n > 0 and not self.exhausted:
            if self.left_in_epoch == 0:
                self.epoch += 1
                self.order = torch.randperm(len(self.counts), generator=self.gen).tolist()
                self.pos, self.row, self.left_in_epoch = 0, 0, self.total
            s = self.order[self.pos]
            k = min(n, self.counts[s] - self.row)
            if k > 0:
                out.append((s, self.row, self.row + k))
                self.row += k
                n -= k
                self.left_in_epoch -= k
            if self.row == self.counts[s]:
                self.pos, self.row = self.pos + 1, 0
        return out


class ActivationStore(_ManifestView):
    """Reads a store directory written by `ActivationStoreWriter`.

    Opening checks the manifest and that every listed shard exists with the listed size; a shard's sha256 is checked
    the first time it is read (``verify_on_read``), and `verify` checks all of them.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        verify_on_read: bool = True,
        require_complete: bool = False,
    ) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise RanklensError(f"activation store {self.directory} is not a directory")
        self._man = _read_manifest(self.directory)
        self._tok_offsets = [0]  # [n_shards + 1] global index of each shard's first stat token
        self._seq_offsets = [0]  # [n_shards + 1] global index of each shard's first sequence
        for s in self._man.shards:
            self._tok_offsets.append(self._tok_offsets[-1] + s.n_tokens)
            self._seq_offsets.append(self._seq_offsets[-1] + s.n_sequences)
        if require_complete and not self._man.complete:
            raise RanklensError(
                f"activation store {self.directory} is incomplete ({self.n_tokens} tokens); resume its collection first"
            )
        _check_shard_files(self.directory, self._man.shards)
        self.verify_on_read = verify_on_read
        self._verified: set[int] = set()
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()

    # -- manifest ---------------------------------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        return self._tok_offsets[-1]

    @property
    def n_sequences(self) -> int:
        return self._seq_offsets[-1]

    @property
    def manifest(self) -> dict[str, Any]:
        return self._man.to_json()

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (
            f"ActivationStore({str(self.directory)!r}, {state}, {self.n_tokens} tokens, "
            f"{len(self._man.shards)} shards, sites={self.sites}, dtype={self._man.dtype})"
        )

    # -- shard access -----------------------------------------------------------------------------------------

    def _check_sha(self, i: int) -> None:
        info = self._man.shards[i]
        path = self.directory / info.file
        try:
            sha = _sha256_file(path)
        except FileNotFoundError:
            raise RanklensError(f"shard {path} is listed in the manifest but missing") from None
        if sha != info.sha256:
            raise RanklensError(
                f"shard {path} has sha256 {sha[:16]}...; the manifest expects {info.sha256[:16]}... (corrupted)"
            )
        self._verified.add(i)

    def _shard(self, i: int) -> _OpenShard:
        sh = self._open.get(i)
        if sh is not None:
            self._open.move_to_end(i)
            return sh
        info = self._man.shards[i]
        path = self.directory / info.file
        _check_shard_files(self.directory, [info])
        if self.verify_on_read and i not in self._verified:
            self._check_sha(i)
        sh = _OpenShard(path, info, self._man.sites, self.dtype)
        self._open[i] = sh
        while len(self._open) > 2:  # keep at most two shards mapped (e.g. a train and an eval iterator)
            self._open.popitem(last=False)
        return sh

    def verify(self) -> None:
        """Check every shard: size, sha256 and contents against the manifest. Raises RanklensError naming the file."""
        _check_shard_files(self.directory, self._man.shards)
        for i in range(len(self._man.shards)):
            self._check_sha(i)
            self._open.pop(i, None)
            self._shard(i)

    def _check_site(self, site: Any) -> str:
        if site not in self._man.sites:
            raise RanklensError(
                f"site {site!r} is not in activation store {self.directory}; it has {sorted(self._man.sites)}"
            )
        return site

    # -- token reader -----------------------------------------------------------------------------------------

    def iter_tokens(
        self, site: str, chunk_tokens: int | None = None, dtype: torch.dtype | None = None
    ) -> Iterator[torch.Tensor]:
        """All stat tokens of a site in storage order, as chunks [<= chunk_tokens, d] (default: one per shard)."""
        self._check_site(site)
        if chunk_tokens is not None and chunk_tokens < 1:
            raise RanklensError(f"chunk_tokens = {chunk_tokens!r}; expected a positive int or None")
        return self._iter_tokens(site, chunk_tokens, dtype)

    def _iter_tokens(
        self, site: str, chunk_tokens: int | None, dtype: torch.dtype | None
    ) -> Iterator[torch.Tensor]:
        for i, info in enumerate(self._man.shards):
            if info.n_tokens == 0:
                continue
            step = chunk_tokens or info.n_tokens
            sh = self._shard(i)
            for r0 in range(0, info.n_tokens, step):
                rows = sh.stat_rows(site, r0, min(r0 + step, info.n_tokens))
                yield rows if dtype is None else rows.to(dtype)

    def token_batches(
        self,
        site: str,
        batch_size: int,
        buffer_tokens: int,
        seed: int,
        start_batch: int = 0,
        epochs: int | None = 1,
        dtype: torch.dtype | None = None,
        drop_last: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Shuffled batches [batch_size, d] of stat tokens through a refilling shuffle buffer (paper App. E.2).

        Per epoch the shard order is shuffled; tokens stream from the shards in that order into a buffer of
        ``buffer_tokens``. Each round the buffer is filled, shuffled (old and new tokens mixed), and its first half
        (rounded down to whole batches) is emitted. Once the stream ends (after ``epochs`` passes; None = forever)
        the rest is shuffled and emitted; the final partial batch is dropped if ``drop_last``.
        Deterministic given the seed. ``start_batch`` skips that many batches: the index-only replay costs one
        permutation per round of the skipped part but reads no activations except those in the buffer at the start.
        Memory: the buffer plus one slice of a shard.
        """
        self._check_site(site)
        for name, v, lo in (
            ("batch_size", batch_size, 1),
            ("buffer_tokens", buffer_tokens, 2),
            ("start_batch", start_batch, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise RanklensError(f"{name} = {v!r}; expected an int >= {lo}")
        if buffer_tokens < 2 * batch_size:
            raise RanklensError(
                f"buffer_tokens = {buffer_tokens}; expected at least 2 * batch_size = {2 * batch_size}"
            )
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise RanklensError(f"epochs = {epochs!r}; expected a positive int or None (repeat forever)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RanklensError(f"seed = {seed!r}; expected an int")
        return self._token_batches(
            site, batch_size, buffer_tokens, seed, start_batch, epochs, dtype, drop_last
        )

    def _token_batches(
        self,
        site: str,
        batch_size: int,
        buffer_tokens: int,
        seed: int,
        start_batch: int,
        epochs: int | None,
        dtype: torch.dtype | None,
        drop_last: bool,
    ) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        stream = _TokenStream([s.n_tokens for s in self._man.shards], epochs, gen)
        # Slots of a fixed buffer; a store smaller than the buffer needs fewer (same stream, same batches).
        cap = buffer_tokens if epochs is None else min(buffer_tokens, stream.total * epochs)
        if cap == 0:
            return
        d = self._man.sites[site]
        offsets = self._tok_offsets
        ids = torch.empty(cap, dtype=torch.int64)  # [cap] global stat-token index held by each slot
        data: torch.Tensor | None = None  # [cap, d] activations by slot, allocated once output starts
        if start_batch == 0:
            data = torch.empty(cap, d, dtype=self.dtype)
        occupied = torch.empty(0, dtype=torch.int64)  # slots holding tokens, in buffer order
        free = torch.arange(cap)  # empty slots, filled in this order
        batch_no = 0
        while True:
            k = 0
            for s, r0, r1 in stream.take(len(free)):
                slots = free[k : k + r1 - r0]
                ids[slots] = torch.arange(offsets[s] + r0, offsets[s] + r1)
                if data is not None:
                    data[slots] = self._shard(s).stat_rows(site, r0, r1)
                k += r1 - r0
            occupied, free = torch.cat([occupied, free[:k]]), free[k:]
            n = len(occupied)
            if n == 0:
                return
            draining = stream.exhausted
            n_emit = n if draining else (n // 2) // batch_size * batch_size
            n_batches = n_emit // batch_size if drop_last else math.ceil(n_emit / batch_size)
            if data is None and batch_no + n_batches > start_batch:  # output starts in this round
                data = torch.empty(cap, d, dtype=self.dtype)
                self._gather(site, ids[occupied], occupied, data, window=buffer_tokens)
            occupied = occupied[torch.randperm(n, generator=gen)]  # shuffle the buffer
            emit, occupied = occupied[:n_emit], occupied[n_emit:]
            if data is not None:
                for b in range(n_batches):
                    if batch_no >= start_batch:
                        out = data[emit[b * batch_size : (b + 1) * batch_size]]  # a copy: slots get refilled
                        yield out if dtype is None else out.to(dtype)
                    batch_no += 1
            else:
                batch_no += n_batches
            free = torch.cat([free, emit])
            if draining:
                return

    def _gather(
        self, site: str, ids: torch.Tensor, slots: torch.Tensor, out: torch.Tensor, window: int
    ) -> None:
        """out[slots] = activations of the global stat-token indices ids, one shard (and row window) at a time."""
        bounds = torch.tensor(self._tok_offsets, dtype=torch.int64)
        shard_of = torch.searchsorted(bounds, ids, right=True) - 1
        for s in torch.unique(shard_of).tolist():
            where = torch.nonzero(shard_of == s).flatten()
            rows = ids[where] - self._tok_offsets[s]
            order = torch.argsort(rows)
            where, rows = where[order], rows[order]
            sh = self._shard(s)
            start = 0
            while start < len(rows):
                r0 = int(rows[start])
                stop = int(torch.searchsorted(rows, r0 + window))
                block = sh.stat_rows(site, r0, int(rows[stop - 1]) + 1)
                out[slots[where[start:stop]]] = block[rows[start:stop] - r0]
                start = stop

    # -- sequence reader --------------------------------------------------------------------------------------

    def sequences(
        self,
        sites: Sequence[str],
        batch_size: int,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        drop_last: bool = False,
        pad_id: int = 0,
    ) -> Iterator[SequenceBatch]:
        """Whole sequences right-padded to the batch's longest, for the given sites.

        Storage order without a seed; with a seed, the shard order and the order within each shard are shuffled
        (deterministically). Loads one shard (all its positions for the requested sites) at a time.
        """
        if isinstance(sites, str):
            sites = [sites]
        sites = [self._check_site(s) for s in sites]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RanklensError(f"batch_size = {batch_size!r}; expected a positive int")
        return self._sequences(list(sites), batch_size, seed, dtype, drop_last, pad_id)

    def _sequences(
        self,
        sites: list[str],
        batch_size: int,
        seed: int | None,
        dtype: torch.dtype | None,
        drop_last: bool,
        pad_id: int,
    ) -> Iterator[SequenceBatch]:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        n_shards = len(self._man.shards)
        order = torch.randperm(n_shards, generator=gen).tolist() if gen is not None else range(n_shards)
        pending: list[tuple[int, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]] = []
        for s in order:
            info = self._man.shards[s]
            if info.n_sequences == 0:
                continue
            sh = self._shard(s)
            tensors = {site: sh.get(site) for site in sites}
            ids = sh.get("input_ids")
            assert sh.stat_mask is not None and sh.seq_offsets is not None
            mask, offs = sh.stat_mask, sh.seq_offsets.tolist()
            within = (
                torch.randperm(info.n_sequences, generator=gen).tolist()
                if gen is not None
                else range(info.n_sequences)
            )
            for j in within:
                a, b = offs[j], offs[j + 1]
                pending.append(
                    (self._seq_offsets[s] + j, {k: t[a:b] for k, t in tensors.items()}, ids[a:b], mask[a:b])
                )
                if len(pending) == batch_size:
                    yield _collate(pending, sites, dtype, pad_id)
                    pending = []
        if pending and not drop_last:
            yield _collate(pending, sites, dtype, pad_id)


def _collate(
    items: list[tuple[int, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]],
    sites: list[str],
    dtype: torch.dtype | None,
    pad_id: int,
) -> SequenceBatch:
    lengths = torch.tensor([len(it[2]) for it in items], dtype=torch.int64)  # [B]
    n, t_max = len(items), int(lengths.max())
    acts = {}
    for site in sites:
        first = items[0][1][site]
        x = torch.zeros(n, t_max, first.shape[1], dtype=dtype or first.dtype)  # [B, T_max, d]
        for r, it in enumerate(items):
            x[r, : len(it[2])] = it[1][site]
        acts[site] = x
    input_ids = torch.full((n, t_max), pad_id, dtype=torch.int64)
    stat_mask = torch.zeros(n, t_max, dtype=torch.bool)
    for r, it in enumerate(items):
        input_ids[r, : len(it[2])] = it[2]
        stat_mask[r, : len(it[3])] = it[3]
    attention_mask = torch.arange(t_max)[None, :] < lengths[:, None]
    return SequenceBatch(
        acts=acts,
        input_ids=input_ids,
        lengths=lengths,
        stat_mask=stat_mask,
        attention_mask=attention_mask,
        sequence_ids=torch.tensor([it[0] for it in items], dtype=torch.int64),
    )
