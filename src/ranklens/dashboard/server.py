"""A local server for a written dashboard: the static site plus the prompt API that its prompt box calls.

``make_app(site_dir, analyzer)`` returns a Starlette app; ``serve`` runs it with uvicorn on 127.0.0.1. The
``analyzer`` is a plain callable ``analyzer(text) -> response`` that holds the model (loaded once, by its maker)::

    GET  /api/info     {"kind": "sae"|"lorsa", "title": ..., "max_chars": ...}
    POST /api/prompt   body {"text": "..."} -> {"tokens": [str], "features": [[[id, act], ...] per token],
                                                 "heads" (lorsa): [[{"id", "act", "z": [per token]}, ...] per token]}
    everything else    the files of the site (index.html, app.js, data/...)

A bad request (a body that is not UTF-8 JSON, not an object, without a string ``text``; a text that is empty,
longer than ``max_chars`` or holds control characters) gets HTTP 400 ``{"error": message}`` and never reaches the
analyzer. The analyzer runs in a worker thread, one call at a time (models are rarely thread-safe). A
``RanklensError`` it raises is the user's input (say, a prompt longer than the model's context) and gets a 400 with
its message; any other exception a 500 with a one-line message, its traceback in the server's log, and the server
goes on serving. A response that breaks the contract is a 500 too, never passed on half-checked.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ranklens.dashboard.site_writer import MARKER, to_json
from ranklens.errors import RanklensError

__all__ = ["Analyzer", "make_app", "serve"]

log = logging.getLogger("ranklens.dashboard.server")

Analyzer = Callable[[str], Mapping[str, Any]]

# C0 controls except tab, newline and carriage return; DEL; C1 controls; unpaired surrogates (JSON can spell them).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_MAX_ERROR = 300


class _BadRequest(Exception):
    pass


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store"})


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_ERROR else line[: _MAX_ERROR - 3] + "..."


def read_site_meta(site_dir: Path) -> dict:
    """The ``meta`` of a written site, read back from ``data/meta.js``."""
    path = site_dir / "data" / "meta.js"
    if not (site_dir / MARKER).is_file() or not path.is_file() or not (site_dir / "index.html").is_file():
        raise RanklensError(f"{str(site_dir)!r} is not a ranklens dashboard site (write one with write_site)")
    text = path.read_text(encoding="utf-8")
    m = re.fullmatch(r'window\.RANKLENS\.register\("meta",null,(.*)\);\s*', text, flags=re.DOTALL)
    if not m:
        raise RanklensError(f"{str(path)!r} is not a dashboard meta file")
    return json.loads(m.group(1))["meta"]


def _validate_text(body: bytes, max_chars: int) -> str:
    try:
        raw = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _BadRequest(f'the body is not UTF-8 text (byte {err.start}); send JSON {{"text": "..."}}') from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise _BadRequest(f'the body is not JSON ({err.msg} at character {err.pos}); send {{"text": "..."}}') from None
    if not isinstance(data, dict):
        raise _BadRequest(f'the body must be a JSON object {{"text": "..."}}, got a JSON {type(data).__name__}')
    if "text" not in data:
        raise _BadRequest('missing field "text": send {"text": "..."}')
    text = data["text"]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise _BadRequest(f'"text" must be a string, got {kind}')
    bad = _CONTROL.search(text)
    if bad:
        raise _BadRequest(f"the text holds the control character U+{ord(bad.group()):04X} at position {bad.start()}: "
                          "send plain text, not binary data")
    if not text.strip():
        raise _BadRequest("the text is empty")
    if len(text) > max_chars:
        raise _BadRequest(f"the text has {len(text)} characters; at most {max_chars} are accepted")
    return text


def _check_response(resp: Any, kind: str) -> dict:
    """The analyzer's response, checked against the contract and made plain JSON (floats rounded, NaN as null)."""
    if not isinstance(resp, Mapping):
        raise ValueError(f"expected a mapping, got {type(resp).__name__}")
    tokens = resp.get("tokens")
    if not isinstance(tokens, list | tuple) or not all(isinstance(t, str) for t in tokens):
        raise ValueError('"tokens" must be a list of strings')
    n = len(tokens)
    features = resp.get("features")
    if not isinstance(features, list | tuple) or len(features) != n:
        raise ValueError(f'"features" must hold one list per token ({n})')
    out_features = []
    for i, per_token in enumerate(features):
        row = []
        for pair in per_token:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ValueError(f'"features"[{i}] must hold [id, act] pairs, got {pair!r}')
            row.append([int(pair[0]), to_json(float(pair[1]))])
        out_features.append(row)
    out: dict[str, Any] = {"tokens": list(tokens), "features": out_features}
    if kind == "lorsa":
        heads = resp.get("heads")
        if not isinstance(heads, list | tuple) or len(heads) != n:
            raise ValueError(f'"heads" must hold one list per token ({n}) for a Lorsa')
        out_heads = []
        for i, per_token in enumerate(heads):
            row = []
            for head in per_token:
                if not isinstance(head, Mapping) or not {"id", "act", "z"} <= head.keys():
                    raise ValueError(f'"heads"[{i}] must hold {{"id", "act", "z"}} objects')
                z = to_json(list(head["z"]) if not hasattr(head["z"], "tolist") else head["z"].tolist())
                if len(z) != n:
                    raise ValueError(f'"heads"[{i}]: z must have one value per token ({n}), got {len(z)}')
                row.append({"id": int(head["id"]), "act": to_json(float(head["act"])), "z": z})
            out_heads.append(row)
        out["heads"] = out_heads
    return out


class _NoSniff:
    """Adds ``X-Content-Type-Options: nosniff`` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with_header)


def make_app(site_dir: str | Path, analyzer: Analyzer, *, max_chars: int = 2000) -> Starlette:
    """The Starlette app serving the site in ``site_dir`` with ``GET /api/info`` and ``POST /api/prompt``."""
    site = Path(site_dir)
    meta = read_site_meta(site)
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    kind, title = meta["kind"], meta["title"]
    body_limit = 12 * max_chars + 4096  # JSON may spell a character as six bytes (\\u0041), UTF-8 as four
    lock = threading.Lock()

    def run(text: str) -> Any:
        with lock:
            return analyzer(text)

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"kind": kind, "title": title, "max_chars": max_chars},
                            headers={"Cache-Control": "no-store"})

    async def prompt(request: Request) -> JSONResponse:
        try:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > body_limit:
                    raise _BadRequest(f"the request body is larger than {body_limit} bytes; the text may have at "
                                      f"most {max_chars} characters")
                chunks.append(chunk)
            text = _validate_text(b"".join(chunks), max_chars)
        except _BadRequest as err:
            return _error(400, str(err))
        try:
            result = await run_in_threadpool(run, text)
        except RanklensError as err:
            return _error(400, _one_line(str(err)))
        except Exception as err:
            log.exception("the analyzer failed on a prompt of %d characters", len(text))
            return _error(500, _one_line(f"the analyzer failed: {type(err).__name__}: {err}"))
        try:
            checked = _check_response(result, kind)
        except (TypeError, ValueError) as err:
            log.error("the analyzer returned an invalid response: %s", err)
            return _error(500, _one_line(f"the analyzer returned an invalid response: {err}"))
        return JSONResponse(checked, headers={"Cache-Control": "no-store"})

    allowed = {"/api/info": "GET", "/api/prompt": "POST"}

    async def api_other(request: Request) -> JSONResponse:
        path = request.url.path
        if path in allowed:  # a known endpoint with the wrong method
            resp = _error(405, f"{path} takes {allowed[path]}, not {request.method}")
            resp.headers["Allow"] = allowed[path]
            return resp
        return _error(404, f"no API endpoint {path} (there are GET api/info and POST api/prompt)")

    routes = [
        Route("/api/info", info, methods=["GET"]),
        Route("/api/prompt", prompt, methods=["POST"]),
        Route("/api/{rest:path}", api_other, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
        Mount("/", app=StaticFiles(directory=site, html=True)),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(_NoSniff)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(site_dir: str | Path, analyzer: Analyzer, host: str = "127.0.0.1", port: int = 8000, *,
          max_chars: int = 2000) -> None:
    """Serve the site in ``site_dir`` with its prompt API until interrupted (Ctrl+C)."""
    import uvicorn

    app = make_app(site_dir, analyzer, max_chars=max_chars)
    if not _is_loopback(host):
        log.warning("serving on %s: the dashboard has no authentication, and anyone who reaches this address can "
                    "run prompts through the model", host)
    shown = f"[{host}]" if ":" in host else host
    print(f"ranklens dashboard: http://{shown}:{port}/  (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
