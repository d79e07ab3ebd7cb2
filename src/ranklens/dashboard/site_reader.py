"""Read a written dashboard back into the records of its contract, and attach autointerp results to it.

The dashboard's scan is the one place that computes top activations, interval samples and (for Lorsa) z-patterns;
``ranklens.autointerp`` reads them from here rather than scanning a second way. The storage details (scripts that
call ``window.RANKLENS.register``, interned token strings, contexts as arrays) stay inside the dashboard package:
this module undoes what ``site_writer`` does, so callers see the records of ``docs/dashboard.md``.

``attach_autointerp`` adds ``data/autointerp.js`` (explanations and scores per feature) to a written site and lists
it in ``meta.js``; ``app.js`` then shows an explanation column in the table and a section on each feature page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ranklens.dashboard.site_writer import MARKER, _js, to_json
from ranklens.errors import RanklensError
from ranklens.io import atomic_write_bytes, read_json

RANDOM_WINDOWS_NAME = "random_windows.json"  # written by `ranklens dashboard` beside the site's data
AUTOINTERP_DATA = "data/autointerp.js"
_PAYLOAD = re.compile(r'window\.RANKLENS\.register\(("[a-z]+"),(null|\d+),(.*)\);\s*', flags=re.DOTALL)


def read_payload(path: Path) -> tuple[str, int | None, Any]:
    """(kind, key, payload) of one data file."""
    m = _PAYLOAD.fullmatch(Path(path).read_text(encoding="utf-8"))
    if not m:
        raise RanklensError(f"{str(path)!r} is not a dashboard data file")
    return json.loads(m.group(1)), json.loads(m.group(2)), json.loads(m.group(3))


def check_site(site: str | Path) -> Path:
    site = Path(site)
    if not (site / MARKER).is_file() or not (site / "data" / "meta.js").is_file():
        raise RanklensError(f"{str(site)!r} is not a complete ranklens dashboard (build one with `ranklens "
                            "dashboard RUN`)")
    return site


def read_manifest(site: str | Path) -> dict:
    """The manifest of ``meta.js``: ``meta``, ``files``, ``n_records``."""
    return read_payload(check_site(site) / "data" / "meta.js")[2]


def read_index(site: str | Path) -> list[dict]:
    """The index rows (contract form) of a site, in id order."""
    site = check_site(site)
    rows: list[dict] = []
    for rel in read_manifest(site)["files"]["index"]:
        payload = read_payload(site / rel)[2]
        cols, vocab = payload["columns"], payload["vocab"]
        for i in range(payload["n"]):
            row = {key: cols[key][i] for key in cols if key != "top_tokens"}
            row["alive"] = bool(row["alive"])
            row["top_tokens"] = [vocab[t] for t in cols["top_tokens"][i]]
            rows.append(row)
    return rows


def _context(arr: list, vocab: list) -> dict:
    ctx = {"tokens": [vocab[t] for t in arr[0]], "acts": [0.0 if a is None else a for a in arr[1]],
           "peak": arr[2], "doc": arr[3], "pos": arr[4]}
    if len(arr) > 5:
        ctx["z"] = [0.0 if z is None else z for z in arr[5]]
    return ctx


def _record(rec: dict, vocab: list) -> dict:
    out = dict(rec)
    out["top"] = [_context(c, vocab) for c in rec["top"]]
    out["quantiles"] = [{**q, "examples": [_context(c, vocab) for c in q["examples"]]} for q in rec["quantiles"]]
    return out


def read_records(site: str | Path, ids: Iterable[int]) -> dict[int, dict]:
    """The feature records (contract form) of ``ids``; an id without a record is left out."""
    site = check_site(site)
    files = read_manifest(site)["files"]
    size = files["feature_chunk_size"]
    wanted: dict[int, set[int]] = {}
    for i in ids:
        wanted.setdefault(int(i) // size, set()).add(int(i))
    out = {}
    for k, members in sorted(wanted.items()):
        rel = files["features"].get(str(k))
        if rel is None:
            continue
        payload = read_payload(site / rel)[2]
        for rec in payload["features"]:
            if rec["id"] in members:
                out[rec["id"]] = _record(rec, payload["vocab"])
    return out


def read_random_windows(site: str | Path) -> list[dict]:
    """The random context windows the dashboard scan kept (``random_windows.json``): each ``{"tokens": [str],
    "peak": int (the drawn token), "doc": int, "pos": int, "codes": [[[feature, act], ...] per token]}``, every
    active feature at every token."""
    path = check_site(site) / RANDOM_WINDOWS_NAME
    if not path.is_file():
        raise RanklensError(f"{str(site)!r} holds no {RANDOM_WINDOWS_NAME} (a dashboard built before autointerp "
                            "existed); rebuild it with `ranklens dashboard RUN`")
    return read_json(path)["windows"]


def window_context(window: Mapping, feature: int) -> dict:
    """A random window as a context of ``feature``: its activation at every token (0 where it is not active)."""
    acts = [0.0] * len(window["tokens"])
    for j, code in enumerate(window["codes"]):
        for f, a in code:
            if f == feature:
                acts[j] = float(a)
    return {"tokens": list(window["tokens"]), "acts": acts, "peak": window["peak"], "doc": window["doc"],
            "pos": window["pos"]}


def attach_autointerp(site: str | Path, payload: Mapping) -> Path:
    """Write ``payload`` (``{"judge": str, "features": {id: {"explanation": str, "scores": {name: number}}}}``) as
    the site's autointerp data and list it in ``meta.js``; an earlier attachment is replaced. Each file is replaced
    atomically, the data before the manifest that points at it."""
    site = check_site(site)
    features = payload.get("features")
    if not isinstance(features, Mapping):
        raise ValueError('autointerp payload: "features" must map feature ids to results')
    atomic_write_bytes(site / AUTOINTERP_DATA, _js("autointerp", None, to_json(dict(payload))))
    manifest = read_manifest(site)
    manifest["files"]["autointerp"] = AUTOINTERP_DATA
    atomic_write_bytes(site / "data" / "meta.js", _js("meta", None, manifest))
    return site
