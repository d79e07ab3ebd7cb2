"""Write the feature dashboard: a static site that opens from disk (``file://.../index.html``) with no server.

Browsers refuse ``fetch`` of local files, so every data file is a JavaScript file that the page loads with a
``<script>`` tag and that hands its payload to ``window.RANKLENS.register(kind, key, payload)`` (defined by
``app.js``). The layout of a written site (the data contract is in ``docs/dashboard.md``)::

    index.html app.js style.css      static assets, copied from ranklens/dashboard/site/
    data/meta.js                     meta, the list of data files, how many feature records were written
    data/index-000.js ...            the feature table, column-wise, ``index_chunk_rows`` rows per file
    data/features-000.js ...         feature records; file k holds the ids in [k*chunk_size, (k+1)*chunk_size),
                                     loaded only when one of its features is opened
    .ranklens-dashboard              marker: this directory is a complete site written by ranklens

Strings are interned per data file (a ``vocab`` list; tokens are stored as indices into it) and the JavaScript
decodes them back, so the records the page works with are the ones of the contract. Numbers are written as JSON
numbers: integers as they are, floats rounded to 5 significant digits (integral floats written as integers, ``3.0``
as ``3``), NaN and infinities as ``null``.

A build is atomic: it writes into a temporary sibling directory ``.NAME.building-PID-XXXX`` and renames it into
place at the end, replacing an older site (renamed aside to ``.NAME.old-PID-XXXX`` for the instant of the swap, then
deleted). An exception removes the temporary directory; a build killed outright leaves it behind and the next build
into the same place deletes it (and puts back an older site that a kill in the middle of the swap left aside). A
directory that is neither empty nor marked as a ranklens site is never replaced.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ranklens.errors import RanklensError

__all__ = ["FORMAT", "MARKER", "round_floats", "to_json", "write_compare", "write_site"]

FORMAT = "ranklens.dashboard/1"
MARKER = ".ranklens-dashboard"
ASSETS_DIR = Path(__file__).parent / "site"
SITE_ASSETS = ("index.html", "app.js", "style.css")
COMPARE_ASSETS = ("compare.html", "app.js", "style.css")
SIG_DIGITS = 5
MAX_TOP_TOKENS = 5
DENSITY_BINS = 40

META_REQUIRED = ("kind", "title", "model", "n_features", "d", "corpus", "tokens", "dead_definition", "n_dead",
                 "subspace_dim", "logit_note", "metrics", "source")
INDEX_KEYS = ("id", "density", "mean_act", "max_act", "alive", "subspace_share", "top_tokens")
FEATURE_REQUIRED = ("id", "density", "mean_act", "max_act", "alive", "top")
FEATURE_OPTIONAL = ("subspace_share", "act_histogram", "quantiles", "logits", "neighbours", "lorsa")
CONTEXT_KEYS = ("tokens", "acts", "peak", "doc", "pos", "z")
_CONTEXT_KEYSET = frozenset(CONTEXT_KEYS)
_CONTEXT_REQUIRED = frozenset(("tokens", "acts", "peak", "doc", "pos"))
COMPARE_RUN_REQUIRED = ("title", "n_features", "n_dead", "density_histogram", "subspace_histogram")


# --------------------------------------------------------------------------- JSON numbers


def _round_scalar(x: float) -> int | float | None:
    if not math.isfinite(x):
        return None
    r = float(f"{x:.{SIG_DIGITS - 1}e}")
    return int(r) if r.is_integer() and abs(r) < 1e15 else r


def round_floats(values: Any) -> list:
    """A list of JSON numbers from a sequence of floats: 5 significant digits, integral values as ``int``, NaN and
    infinities (and ``None``) as ``None``. Long sequences are rounded vectorized (one call per feature keeps a
    36,864-feature build fast); a value exactly halfway between two 5-digit decimals may go either way."""
    if hasattr(values, "tolist") and not isinstance(values, list):
        values = values.tolist()
    if len(values) < 16:
        return [None if v is None else _round_scalar(float(v)) for v in values]
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):  # None among the values
        a = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    a = a.reshape(-1)
    with np.errstate(all="ignore"):
        finite = np.isfinite(a)
        mag = np.abs(a)
        tiny = mag < 1e-300
        e = np.floor(np.log10(np.where(finite & ~tiny, mag, 1.0)))
        k = (SIG_DIGITS - 1) - e
        scale = 10.0 ** np.abs(k)
        # Dividing (or multiplying) an integer-valued double by an exact power of ten gives the double nearest to
        # the decimal, whose repr is that decimal: no 0.12345000000000001 in the files.
        r = np.where(k >= 0, np.round(a * scale) / scale, np.round(a / scale) * scale)
        r = np.where(tiny, 0.0, r)
    integral = finite & (r == np.trunc(r)) & (np.abs(r) < 1e15)
    out = r.astype(object)
    out[integral] = r[integral].astype(np.int64)
    out[~finite] = None
    return out.tolist()


def to_json(obj: Any) -> Any:
    """``obj`` as plain JSON data: mappings (keys as strings), lists, strings, bools, ``None``, ints, and floats
    through ``round_floats``. numpy scalars and arrays and torch tensors are accepted (anything with ``tolist``),
    paths become strings and datetimes ISO times."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return _round_scalar(float(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, datetime):
        return obj.isoformat(timespec="seconds")
    if hasattr(obj, "tolist"):
        return to_json(obj.tolist())
    if isinstance(obj, list | tuple):
        if obj and all(isinstance(v, float) for v in obj):
            return round_floats(obj)
        return [to_json(v) for v in obj]
    raise TypeError(f"cannot write a {type(obj).__name__} to the dashboard data")


def _dumps(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # Valid JSON, but line terminators inside a JavaScript string literal only since ES2019.
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _js(kind: str, key: Any, payload: Any) -> bytes:
    text = f"window.RANKLENS.register({json.dumps(kind)},{json.dumps(key)},{_dumps(payload)});\n"
    # A lone surrogate (a token decoded from half a character) becomes the escape \udXXX inside its string literal.
    return text.encode("utf-8", errors="backslashreplace")


# --------------------------------------------------------------------------- validation helpers


def _fail(where: str, msg: str) -> ValueError:
    return ValueError(f"dashboard data, {where}: {msg}")


def _int(value: Any, where: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if isinstance(value, float | np.floating) and float(value).is_integer():
            return int(value)
        raise _fail(where, f"expected an integer, got {value!r}")
    return int(value)


def _num(value: Any, where: str) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        if hasattr(value, "item"):  # a 0-d array or tensor
            return _num(value.item(), where)
        raise _fail(where, f"expected a number, got {value!r}")
    return to_json(value)


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and int(value) in (0, 1):
        return bool(value)
    raise _fail(where, f"expected true or false, got {value!r}")


def _list(value: Any, where: str) -> list:
    if hasattr(value, "tolist") and not isinstance(value, list):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise _fail(where, f"expected a list, got {type(value).__name__}")
    return list(value)


def _check_keys(record: Mapping, allowed: Sequence[str], required: Sequence[str], where: str) -> None:
    if not isinstance(record, Mapping):
        raise _fail(where, f"expected a mapping, got {type(record).__name__}")
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        raise _fail(where, f"unknown keys {unknown} (allowed: {list(allowed)})")
    missing = [k for k in required if k not in record]
    if missing:
        raise _fail(where, f"missing keys {missing}")


def _histogram(h: Any, where: str, *, optional: bool = True) -> dict | None:
    if h is None and optional:
        return None
    if not isinstance(h, Mapping) or "edges" not in h or "counts" not in h:
        raise _fail(where, 'expected a histogram {"edges": [...], "counts": [...]}')
    edges, counts = round_floats(_list(h["edges"], where)), to_json(_list(h["counts"], where))
    if len(edges) != len(counts) + 1:
        raise _fail(where, f"a histogram needs one more edge than counts, got {len(edges)} edges and "
                           f"{len(counts)} counts")
    if any(e is None for e in edges):
        raise _fail(where, "histogram edges must be finite")
    return {"edges": edges, "counts": counts}


class _Vocab:
    """Strings interned per data file: the file stores indices, ``app.js`` maps them back."""

    def __init__(self) -> None:
        self.ids: dict[str | None, int] = {}
        self.strings: list[str | None] = []

    def encode(self, tokens: Sequence, where: str) -> list[int]:
        out = list(map(self.ids.get, tokens))
        if None in out:
            for j, t in enumerate(tokens):
                if out[j] is None:
                    if t is not None and not isinstance(t, str):
                        raise _fail(where, f"tokens must be strings (or null outside the document), got {t!r}")
                    i = self.ids.get(t)
                    if i is None:
                        i = self.ids[t] = len(self.strings)
                        self.strings.append(t)
                    out[j] = i
        return out


class _FloatBatch:
    """Float lists of one feature rounded in one vectorized call, then put back where they belong."""

    def __init__(self) -> None:
        self.slots: list[tuple[Any, Any, list]] = []

    def add(self, target: Any, key: Any, values: list) -> None:
        self.slots.append((target, key, values))

    def flush(self) -> None:
        if not self.slots:
            return
        flat = round_floats(list(itertools.chain.from_iterable(v for _, _, v in self.slots)))
        start = 0
        for target, key, values in self.slots:
            target[key] = flat[start:start + len(values)]
            start += len(values)
        self.slots.clear()


# --------------------------------------------------------------------------- records


def _context(ctx: Any, where: str, vocab: _Vocab, batch: _FloatBatch) -> list:
    """A context as the array ``[tokens, acts, peak, doc, pos]`` (``z`` appended for Lorsa): the key names would be
    a seventh of a data file. ``app.js`` turns it back into the contract's object."""
    if type(ctx) is not dict or not ctx.keys() <= _CONTEXT_KEYSET or not ctx.keys() >= _CONTEXT_REQUIRED:
        _check_keys(ctx, CONTEXT_KEYS, tuple(sorted(_CONTEXT_REQUIRED)), where)
    tokens, acts = ctx["tokens"], ctx["acts"]
    if type(tokens) is not list:
        tokens = _list(tokens, where + ".tokens")
    if type(acts) is not list:
        acts = _list(acts, where + ".acts")
    if len(acts) != len(tokens):
        raise _fail(where, f"{len(tokens)} tokens but {len(acts)} acts")
    peak = ctx["peak"]
    if type(peak) is not int:
        peak = _int(peak, where + ".peak")
    if not 0 <= peak < len(tokens):
        raise _fail(where, f"peak {peak} is not an index into its {len(tokens)} tokens")
    doc, pos = ctx["doc"], ctx["pos"]
    out = [vocab.encode(tokens, where), None, peak, doc if type(doc) is int else _int(doc, where + ".doc"),
           pos if type(pos) is int else _int(pos, where + ".pos")]
    batch.add(out, 1, acts)
    z = ctx.get("z")
    if z is not None:
        if type(z) is not list:
            z = _list(z, where + ".z")
        if len(z) != len(tokens):
            raise _fail(where, f"{len(tokens)} tokens but {len(z)} z values")
        out.append(None)
        batch.add(out, 5, z)
    return out


def _token_values(pairs: Any, where: str) -> list:
    out = []
    for i, pair in enumerate(_list(pairs, where)):
        pair = _list(pair, f"{where}[{i}]")
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise _fail(f"{where}[{i}]", f"expected [string, number], got {pair!r}")
        out.append([pair[0], _num(pair[1], f"{where}[{i}]")])
    return out


def _feature(rec: Any, kind: str, vocab: _Vocab) -> dict:
    where = f"feature {rec.get('id', '?') if isinstance(rec, Mapping) else '?'}"
    _check_keys(rec, FEATURE_REQUIRED + FEATURE_OPTIONAL, FEATURE_REQUIRED, where)
    batch = _FloatBatch()
    out: dict[str, Any] = {"id": _int(rec["id"], where + ".id")}
    for key in ("density", "mean_act", "max_act"):
        out[key] = _num(rec[key], f"{where}.{key}")
    out["alive"] = _bool(rec["alive"], where + ".alive")
    out["subspace_share"] = _num(rec.get("subspace_share"), where + ".subspace_share")
    out["act_histogram"] = _histogram(rec.get("act_histogram"), where + ".act_histogram")
    out["top"] = [_context(c, f"{where}.top[{i}]", vocab, batch) for i, c in enumerate(_list(rec["top"], where))]
    quantiles = []
    for qi, q in enumerate(_list(rec.get("quantiles") or [], where + ".quantiles")):
        qw = f"{where}.quantiles[{qi}]"
        _check_keys(q, ("label", "range", "count", "examples"), ("label", "range", "examples"), qw)
        rng = _list(q["range"], qw + ".range")
        if len(rng) != 2:
            raise _fail(qw, f"range must be [lo, hi], got {rng!r}")
        quantiles.append({"label": str(q["label"]), "range": [_num(rng[0], qw), _num(rng[1], qw)],
                          "count": _int(q.get("count"), qw + ".count", allow_none=True),
                          "examples": [_context(c, f"{qw}.examples[{i}]", vocab, batch)
                                       for i, c in enumerate(_list(q["examples"], qw))]})
    out["quantiles"] = quantiles
    logits = rec.get("logits")
    if logits is not None:
        lw = where + ".logits"
        _check_keys(logits, ("promoted", "suppressed", "histogram"), ("promoted", "suppressed"), lw)
        logits = {"promoted": _token_values(logits["promoted"], lw + ".promoted"),
                  "suppressed": _token_values(logits["suppressed"], lw + ".suppressed"),
                  "histogram": _histogram(logits.get("histogram"), lw + ".histogram")}
    out["logits"] = logits
    neighbours = []
    for i, pair in enumerate(_list(rec.get("neighbours") or [], where + ".neighbours")):
        pair = _list(pair, f"{where}.neighbours[{i}]")
        if len(pair) != 2:
            raise _fail(f"{where}.neighbours[{i}]", f"expected [id, cosine], got {pair!r}")
        neighbours.append([_int(pair[0], f"{where}.neighbours[{i}]"), _num(pair[1], f"{where}.neighbours[{i}]")])
    out["neighbours"] = neighbours
    if kind == "lorsa":
        lorsa = rec.get("lorsa")
        if lorsa is not None:
            lw = where + ".lorsa"
            _check_keys(lorsa, ("qk_group", "attribution", "heads_for_90pct"), ("qk_group",), lw)
            lorsa = {"qk_group": _int(lorsa["qk_group"], lw + ".qk_group"),
                     "attribution": _token_values(lorsa.get("attribution") or [], lw + ".attribution"),
                     "heads_for_90pct": _int(lorsa.get("heads_for_90pct"), lw + ".heads_for_90pct",
                                             allow_none=True)}
        out["lorsa"] = lorsa
    elif rec.get("lorsa") is not None:
        raise _fail(where, 'a "lorsa" block in the record of an SAE dashboard (meta kind "sae")')
    batch.flush()
    return out


def _meta(meta: Mapping, index: list[dict]) -> dict:
    if not isinstance(meta, Mapping):
        raise _fail("meta", f"expected a mapping, got {type(meta).__name__}")
    fmt = meta.get("format", FORMAT)
    if fmt != FORMAT:
        raise _fail("meta", f"format {fmt!r} is not {FORMAT!r}")
    kind = meta.get("kind")
    if kind not in ("sae", "lorsa"):
        raise _fail("meta", f'kind must be "sae" or "lorsa", got {kind!r}')
    required = META_REQUIRED + (("site",) if kind == "sae" else ("layer",))
    missing = [k for k in required if k not in meta]
    if missing:
        raise _fail("meta", f"missing keys {missing}")
    if not isinstance(meta["metrics"], Mapping):
        raise _fail("meta.metrics", "expected a mapping {name: number or string}")
    out = to_json(dict(meta))
    out["format"] = FORMAT
    n_features = _int(meta["n_features"], "meta.n_features")
    if n_features != len(index):
        raise _fail("meta", f"n_features is {n_features} but there are {len(index)} index rows")
    n_dead = _int(meta["n_dead"], "meta.n_dead")
    dead_rows = sum(1 for r in index if not r["alive"])
    if n_dead != dead_rows:
        raise _fail("meta", f"n_dead is {n_dead} but {dead_rows} index rows have alive=false")
    if meta.get("density_histogram") is not None:
        out["density_histogram"] = _histogram(meta["density_histogram"], "meta.density_histogram")
    else:
        out["density_histogram"] = _density_histogram([r["density"] for r in index])
    out.setdefault("built", datetime.now(UTC).isoformat(timespec="seconds"))
    return out


def _density_histogram(densities: list) -> dict:
    """log10 densities of the features with a positive density, in DENSITY_BINS bins between whole decades."""
    x = np.asarray([d for d in densities if d is not None and d > 0 and math.isfinite(d)], dtype=np.float64)
    if x.size == 0:
        return {"edges": [-6, 0], "counts": [0]}
    logs = np.log10(x)
    lo, hi = math.floor(logs.min()), math.ceil(logs.max())
    if hi <= lo:
        hi = lo + 1
    counts, edges = np.histogram(logs, bins=DENSITY_BINS, range=(lo, hi))
    return {"edges": round_floats(edges), "counts": counts.tolist()}


def _index_row(row: Any, kind: str) -> dict:
    where = f"index row {row.get('id', '?') if isinstance(row, Mapping) else '?'}"
    keys = INDEX_KEYS + (("qk_group",) if kind == "lorsa" else ())
    _check_keys(row, keys, keys, where)
    tops = _list(row["top_tokens"], where + ".top_tokens")[:MAX_TOP_TOKENS]
    for t in tops:
        if not isinstance(t, str):
            raise _fail(where, f"top_tokens must be strings, got {t!r}")
    out = {"id": _int(row["id"], where + ".id"), "alive": _bool(row["alive"], where + ".alive"),
           "top_tokens": tops}
    for key in ("density", "mean_act", "max_act", "subspace_share"):
        out[key] = row[key] if row[key] is None else float(_num_raw(row[key], f"{where}.{key}"))
    if kind == "lorsa":
        out["qk_group"] = _int(row["qk_group"], where + ".qk_group", allow_none=True)
    return out


def _num_raw(value: Any, where: str) -> float:
    if hasattr(value, "item") and not isinstance(value, int | float):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f"expected a number, got {value!r}")
    return value


def _index_payload(rows: list[dict], start: int, kind: str) -> dict:
    vocab = _Vocab()
    cols: dict[str, Any] = {"id": [r["id"] for r in rows]}
    for key in ("density", "mean_act", "max_act", "subspace_share"):
        cols[key] = round_floats([math.nan if r[key] is None else r[key] for r in rows])
    cols["alive"] = [1 if r["alive"] else 0 for r in rows]
    cols["top_tokens"] = [vocab.encode(r["top_tokens"], f"index row {r['id']}") for r in rows]
    if kind == "lorsa":
        cols["qk_group"] = [r["qk_group"] for r in rows]
    return {"start": start, "n": len(rows), "vocab": vocab.strings, "columns": cols}


# --------------------------------------------------------------------------- atomic directory builds


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(parent: Path, name: str, tag: str) -> list[Path]:
    """Sibling directories ``.NAME.TAG-PID-XXXX`` whose process is gone."""
    prefix = f".{name}.{tag}-"
    found = []
    for p in parent.iterdir() if parent.is_dir() else []:
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            found.append(p)
    return found


def _recover(out: Path) -> None:
    """Clean up after a killed build: put back a complete site left aside mid-swap, delete temporary builds."""
    for old in _stale(out.parent, out.name, "old"):
        if not out.exists() and (old / MARKER).is_file():
            os.rename(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in _stale(out.parent, out.name, "building"):
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise RanklensError(f"{str(out)!r} exists and is not a directory; not replacing it with a dashboard")
    if (out / MARKER).is_file() or not any(out.iterdir()):
        return
    raise RanklensError(f"{str(out)!r} is a non-empty directory that is not a ranklens dashboard (no {MARKER}); "
                        f"not replacing it: choose another output directory")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Build:
    """A site being written into a temporary sibling of ``out``; ``commit`` renames it into place."""

    def __init__(self, out: Path) -> None:
        self.out = Path(os.path.abspath(out))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _recover(self.out)
        _check_replaceable(self.out)
        self.tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp = self.out.parent / f".{self.out.name}.building-{self.tag}"
        self.tmp.mkdir()
        (self.tmp / "data").mkdir()

    def write(self, rel: str, data: bytes) -> int:
        path = self.tmp / rel
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, 0o644)
        return len(data)

    def copy_assets(self, names: Sequence[str]) -> None:
        for name in names:
            self.write(name, (ASSETS_DIR / name).read_bytes())

    def commit(self, kind: str) -> Path:
        marker = {"format": FORMAT, "kind": kind, "built": datetime.now(UTC).isoformat(timespec="seconds")}
        self.write(MARKER, (json.dumps(marker) + "\n").encode())
        _fsync_dir(self.tmp / "data")
        _fsync_dir(self.tmp)
        os.chmod(self.tmp, 0o755)  # mkdir honours the umask; a site is meant to be shared like a report
        if self.out.exists() or self.out.is_symlink():
            aside = self.out.parent / f".{self.out.name}.old-{self.tag}"
            os.rename(self.out, aside)
            os.rename(self.tmp, self.out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- public API


def write_site(out_dir: str | Path, meta: Mapping, index_rows: Iterable[Mapping], features: Iterable[Mapping], *,
               chunk_size: int = 256, index_chunk_rows: int = 8192, extra_files: Mapping[str, bytes] | None = None,
               ) -> Path:
    """Write the dashboard of one dictionary to ``out_dir`` (replacing an older dashboard there) and return its path.

    ``meta`` and the ``index_rows`` (one per feature) follow the contract of ``docs/dashboard.md``; ``features`` is
    an iterable of feature records, consumed once and lazily (a generator computing them keeps memory flat). Records
    may come in any order: a data file is written as soon as all the features of its id range have arrived, so
    records in id order keep at most one file's worth in memory. A feature of the index without a record is shown as
    such in the page (``meta.js`` counts them). Raises ``ValueError`` on data that breaks the contract (an unknown
    key, a missing one, tokens and acts of different lengths, a record for an id not in the index, ...), and leaves
    any older site in place. ``extra_files`` (relative name -> bytes) are written into the site too, e.g. the
    numbers a comparison of two sites reads back.
    """
    if chunk_size < 1 or index_chunk_rows < 1:
        raise ValueError("chunk_size and index_chunk_rows must be positive")
    kind = meta.get("kind") if isinstance(meta, Mapping) else None
    if kind not in ("sae", "lorsa"):
        raise _fail("meta", f'kind must be "sae" or "lorsa", got {kind!r}')
    index = sorted((_index_row(r, kind) for r in index_rows), key=lambda r: r["id"])
    ids = [r["id"] for r in index]
    if len(set(ids)) != len(ids):
        dup = next(a for a, b in itertools.pairwise(ids) if a == b)
        raise _fail("index", f"feature id {dup} appears more than once")
    if ids and ids[0] < 0:
        raise _fail("index", f"feature ids must be non-negative, got {ids[0]}")
    meta_out = _meta(meta, index)

    build = _Build(Path(out_dir))
    try:
        build.copy_assets(SITE_ASSETS)
        index_files = []
        for c, start in enumerate(range(0, len(index), index_chunk_rows)):
            rel = f"data/index-{c:03d}.js"
            build.write(rel, _js("index", c, _index_payload(index[start:start + index_chunk_rows], start, kind)))
            index_files.append(rel)

        expected: dict[int, int] = {}
        for i in ids:
            expected[i // chunk_size] = expected.get(i // chunk_size, 0) + 1
        n_chunks = (ids[-1] // chunk_size + 1) if ids else 0
        width = max(3, len(str(max(n_chunks - 1, 0))))
        known = set(ids)
        pending: dict[int, tuple[_Vocab, list[dict]]] = {}
        seen: set[int] = set()
        feature_files: dict[str, str] = {}
        n_records = 0

        def flush(k: int) -> None:
            vocab, records = pending.pop(k)
            records.sort(key=lambda r: r["id"])
            rel = f"data/features-{k:0{width}d}.js"
            build.write(rel, _js("features", k, {"chunk": k, "vocab": vocab.strings, "features": records}))
            feature_files[str(k)] = rel

        for rec in features:
            fid = rec.get("id") if isinstance(rec, Mapping) else None
            fid = _int(fid, "feature record id")
            if fid not in known:
                raise _fail(f"feature {fid}", "no index row has this id")
            if fid in seen:
                raise _fail(f"feature {fid}", "a second record for this id")
            seen.add(fid)
            k = fid // chunk_size
            vocab, records = pending.setdefault(k, (_Vocab(), []))
            records.append(_feature(rec, kind, vocab))
            n_records += 1
            expected[k] -= 1
            if expected[k] == 0:
                flush(k)
        for k in sorted(pending):
            flush(k)

        manifest = {"meta": meta_out,
                    "files": {"index": index_files, "feature_chunk_size": chunk_size,
                              "features": dict(sorted(feature_files.items(), key=lambda kv: int(kv[0])))},
                    "n_records": n_records, "n_missing_records": len(ids) - n_records}
        build.write("data/meta.js", _js("meta", None, manifest))
        for rel, data in (extra_files or {}).items():
            build.write(rel, data)
        return build.commit("site")
    except BaseException:
        build.abort()
        raise


def write_compare(out_dir: str | Path, data: Mapping) -> Path:
    """Write the comparison page of two runs (``compare.html`` with ``data/compare.js``) to ``out_dir``, replacing an
    older dashboard there, and return its path. ``data`` follows the contract of ``docs/dashboard.md``: ``a`` and
    ``b`` (title, n_features, n_dead, density_histogram, subspace_histogram, optional site_href: the path of that
    run's site relative to ``out_dir``), ``cosine_histogram`` and ``pairs`` ([a_id, b_id, cosine]; b_id may be
    null)."""
    _check_keys(data, ("a", "b", "cosine_histogram", "pairs", "title", "built"), ("a", "b", "cosine_histogram", "pairs"),
                "compare")
    out: dict[str, Any] = {"format": FORMAT}
    for side in ("a", "b"):
        run = data[side]
        where = f"compare.{side}"
        _check_keys(run, COMPARE_RUN_REQUIRED + ("site_href",), COMPARE_RUN_REQUIRED, where)
        href = run.get("site_href")
        if href is not None and not isinstance(href, str):
            raise _fail(where, f"site_href must be a string, got {href!r}")
        if href is not None and re.match(r"[a-z][a-z0-9+.-]*:", href, flags=re.I) and \
                not re.match(r"(https?|file):", href, flags=re.I):
            raise _fail(where, f"site_href must be a relative path or an http(s)/file URL, got {href!r}")
        out[side] = {"title": str(run["title"]), "n_features": _int(run["n_features"], where + ".n_features"),
                     "n_dead": _int(run["n_dead"], where + ".n_dead"),
                     "density_histogram": _histogram(run["density_histogram"], where + ".density_histogram",
                                                     optional=False),
                     "subspace_histogram": _histogram(run["subspace_histogram"], where + ".subspace_histogram",
                                                      optional=False),
                     "site_href": href}
    out["cosine_histogram"] = _histogram(data["cosine_histogram"], "compare.cosine_histogram", optional=False)
    pairs = []
    for i, pair in enumerate(_list(data["pairs"], "compare.pairs")):
        pair = _list(pair, f"compare.pairs[{i}]")
        if len(pair) != 3:
            raise _fail(f"compare.pairs[{i}]", f"expected [a_id, b_id, cosine], got {pair!r}")
        pairs.append([_int(pair[0], f"compare.pairs[{i}]"), _int(pair[1], f"compare.pairs[{i}]", allow_none=True),
                      pair[2]])
    cos = round_floats([math.nan if p[2] is None else _num_raw(p[2], "compare.pairs") for p in pairs])
    for p, c in zip(pairs, cos, strict=True):
        p[2] = c
    out["pairs"] = pairs
    out["title"] = str(data.get("title") or f"{out['a']['title']} vs {out['b']['title']}")
    out["built"] = str(data.get("built") or datetime.now(UTC).isoformat(timespec="seconds"))

    build = _Build(Path(out_dir))
    try:
        build.copy_assets(COMPARE_ASSETS)
        build.write("data/compare.js", _js("compare", None, out))
        return build.commit("compare")
    except BaseException:
        build.abort()
        raise
