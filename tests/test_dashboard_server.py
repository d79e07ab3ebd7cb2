"""The dashboard's local server: the Starlette app under uvicorn on a free loopback port, in a thread, spoken to
over real HTTP (urllib) and through the page's prompt box in Chromium. The analyzer is a small deterministic
callable written here: what is under test is the server and the page, not a model."""

from __future__ import annotations

import inspect
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import zlib

import pytest
import uvicorn

from dashboard_browser import WatchedPage, launch
from dashboard_data import SyntheticDashboard
from ranklens.dashboard import write_site
from ranklens.dashboard.server import make_app, serve
from ranklens.dashboard.site_writer import round_floats
from ranklens.errors import RanklensError

N = 200
MAX_CHARS = 200
TOKEN = re.compile(r"\s*\S+|\s+")


def sae_analyzer(text: str) -> dict:
    if "boom" in text:
        raise RuntimeError("model exploded\nsecond line of the traceback")
    if "overflow" in text:
        raise RanklensError("the prompt has more tokens than the model's context (1024)")
    if "garbled" in text:
        return {"tokens": ["a", "b"], "features": [[]]}
    tokens = TOKEN.findall(text)
    features = []
    for t in tokens:
        h = zlib.crc32(t.encode())
        features.append([[(h + 7919 * j) % N, 3.0 / (j + 1) + (h % 1000) / 997] for j in range(3)])
    return {"tokens": tokens, "features": features}


def lorsa_analyzer(text: str) -> dict:
    out = sae_analyzer(text)
    n = len(out["tokens"])
    out["heads"] = [[{"id": fid, "act": act, "z": [act * (j + 1) / (i + 1) ** 2 if j <= i else 0.0 for j in range(n)]}
                     for fid, act in per_token[:2]] for i, per_token in enumerate(out["features"])]
    return out


class ServerThread:
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn exited"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    for kind in ("sae", "lorsa"):
        s = SyntheticDashboard(kind, N, n_top=4, quantiles=1, examples=1)
        write_site(root / kind, s.meta(), s.index_rows(), s.features(), chunk_size=64)
    return root


@pytest.fixture(scope="module")
def sae_server(sites):
    with ServerThread(make_app(sites / "sae", sae_analyzer, max_chars=MAX_CHARS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def lorsa_server(sites):
    with ServerThread(make_app(sites / "lorsa", lorsa_analyzer, max_chars=MAX_CHARS)) as srv:
        yield srv


def request(srv: ServerThread, path: str, body: bytes | None = None, *, method: str | None = None,
            content_type: str = "application/json"):
    """(status, headers, body bytes) of one real HTTP request."""
    req = urllib.request.Request(srv.url + path, data=body, method=method or ("POST" if body is not None else "GET"))
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def post_json(srv: ServerThread, obj) -> tuple[int, dict]:
    status, _, body = request(srv, "api/prompt", json.dumps(obj).encode())
    return status, json.loads(body)


# --------------------------------------------------------------------------- HTTP


def test_info_and_static_files(sae_server):
    status, headers, body = request(sae_server, "api/info")
    assert status == 200 and json.loads(body) == {"kind": "sae", "title": SyntheticDashboard("sae", N).title,
                                                  "max_chars": MAX_CHARS}
    status, headers, body = request(sae_server, "")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"app.js" in body
    status, headers, body = request(sae_server, "data/meta.js")
    assert status == 200 and "javascript" in headers["Content-Type"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, _, body = request(sae_server, "api/nothing")
    assert status == 404 and "api/info" in json.loads(body)["error"]
    status, _, _ = request(sae_server, "api/prompt")  # GET
    assert status == 405
    status, _, _ = request(sae_server, "../../etc/passwd")
    assert status == 404


def test_prompt_answers_with_the_analyzers_response(sae_server):
    text = "The cat sat on the mat.\nThe cat"
    status, body = post_json(sae_server, {"text": text})
    assert status == 200
    want = sae_analyzer(text)
    assert body["tokens"] == want["tokens"]
    assert body["features"] == [[[fid, round_floats([act])[0]] for fid, act in per] for per in want["features"]]


@pytest.mark.parametrize(("body", "message"), [
    (b"", "not JSON"),
    (b"text=hello", "not JSON"),
    (b"{\"text\": ", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[\"hello\"]", "must be a JSON object"),
    (b"{}", "missing field \"text\""),
    (b"{\"prompt\": \"hello\"}", "missing field \"text\""),
    (b"{\"text\": 42}", "\"text\" must be a string, got int"),
    (b"{\"text\": null}", "\"text\" must be a string, got null"),
    (b"{\"text\": [\"a\"]}", "\"text\" must be a string, got list"),
    (b"{\"text\": \"\"}", "the text is empty"),
    (b"{\"text\": \"  \\n \"}", "the text is empty"),
    (b"{\"text\": \"ab\\u0000cd\"}", "control character U+0000 at position 2"),
    (b"{\"text\": \"\\u0007bell\"}", "control character U+0007"),
    (b"{\"text\": \"half \\ud800 surrogate\"}", "control character U+D800"),
    (json.dumps({"text": "x" * (MAX_CHARS + 1)}).encode(), f"has {MAX_CHARS + 1} characters; at most {MAX_CHARS}"),
    (json.dumps({"text": "x" * 50_000}).encode(), "larger than"),
])
def test_bad_requests_get_400_with_a_message(sae_server, body, message):
    status, headers, raw = request(sae_server, "api/prompt", body)
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert message in json.loads(raw)["error"]


def test_tabs_and_newlines_are_text(sae_server):
    status, body = post_json(sae_server, {"text": "a\tb\r\nc"})
    assert status == 200 and "".join(body["tokens"]) == "a\tb\r\nc"


def test_analyzer_failures(sae_server):
    status, body = post_json(sae_server, {"text": "boom"})
    assert status == 500
    assert body["error"] == "the analyzer failed: RuntimeError: model exploded second line of the traceback"
    status, body = post_json(sae_server, {"text": "overflow"})  # the user's input: a 400
    assert status == 400 and "more tokens than the model's context" in body["error"]
    status, body = post_json(sae_server, {"text": "garbled"})
    assert status == 500 and "invalid response" in body["error"]
    status, body = post_json(sae_server, {"text": "still serving"})  # the server goes on
    assert status == 200 and body["tokens"] == ["still", " serving"]


def test_lorsa_response_and_info(lorsa_server):
    status, _, body = request(lorsa_server, "api/info")
    assert json.loads(body)["kind"] == "lorsa"
    status, body = post_json(lorsa_server, {"text": "one two three"})
    assert status == 200 and len(body["heads"]) == 3
    assert body["heads"][2][0]["z"] == round_floats(lorsa_analyzer("one two three")["heads"][2][0]["z"])


def test_make_app_needs_a_site_and_serve_binds_loopback(tmp_path):
    with pytest.raises(RanklensError, match="not a ranklens dashboard site"):
        make_app(tmp_path, sae_analyzer)
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


# --------------------------------------------------------------------------- the prompt box in the browser


@pytest.fixture(scope="module")
def browser():
    pw, browser = launch()
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture
def watched(browser):
    w = WatchedPage(browser)
    yield w
    try:
        w.check()
    finally:
        w.close()


def open_served(w: WatchedPage, srv: ServerThread):
    page = w.page
    page.goto(srv.url + "index.html")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_selector("#prompt-form:not([hidden])")
    return page


def analyse(page, text: str) -> None:
    page.fill("#prompt-text", text)
    page.click("#prompt-submit")
    page.wait_for_function("!document.getElementById('prompt-submit').disabled && "
                           "!document.getElementById('prompt-result').hasAttribute('aria-busy')")


def test_prompt_box(watched, sae_server):
    page = open_served(watched, sae_server)
    assert "at most 200 characters" in page.inner_text("#prompt-note")
    text = "The cat sat on the mat."
    analyse(page, text)
    want = sae_analyzer(text)
    rows = page.locator("#prompt-table tbody tr")
    assert rows.count() == len(want["tokens"])
    chips = page.eval_on_selector_all("#prompt-table tbody tr >> nth=1 >> a.fchip",
                                      "as => as.map(a => [Number(a.dataset.feature), Number(a.dataset.act)])")
    assert chips == [[fid, round_floats([act])[0]] for fid, act in want["features"][1]]
    fid = want["features"][1][0][0]
    page.hover(f"#prompt-table tbody tr >> nth=1 >> a.fchip[data-feature='{fid}']")
    strip = page.eval_on_selector_all("#prompt-strip .tok", "ts => ts.map(t => Number(t.dataset.act))")
    assert strip[1] == round_floats([want["features"][1][0][1]])[0]
    page.click(f"#prompt-table tbody tr >> nth=1 >> a.fchip[data-feature='{fid}']")
    page.wait_for_selector("#top-contexts")
    assert page.url.endswith(f"#feature={fid}")
    page.go_back()
    page.wait_for_selector("#overview-view:not([hidden])")
    assert page.locator("#prompt-table tbody tr").count() == len(want["tokens"])  # the result is still there


def test_prompt_box_shows_server_errors(watched, sae_server):
    watched.allow(r"Failed to load resource: the server responded with a status of (400|500)")
    page = open_served(watched, sae_server)
    analyse(page, "x" * (MAX_CHARS + 5))
    assert page.locator("#prompt-count.over").count() == 1
    err = page.inner_text("#prompt-error")
    assert "(400)" in err and f"at most {MAX_CHARS} are accepted" in err
    analyse(page, "boom")
    assert "(500)" in page.inner_text("#prompt-error") and "model exploded" in page.inner_text("#prompt-error")
    analyse(page, "fine again")
    assert page.locator("#prompt-error").is_hidden()
    assert page.locator("#prompt-table tbody tr").count() == 2


def test_lorsa_prompt_z_patterns(watched, lorsa_server):
    page = open_served(watched, lorsa_server)
    text = "one two three four"
    analyse(page, text)
    want = lorsa_analyzer(text)
    head = want["heads"][3][0]
    page.click(f"#prompt-table tbody tr >> nth=3 >> button.zbtn[data-head='{head['id']}']")
    z = page.eval_on_selector_all("#prompt-strip .tok", "ts => ts.map(t => Number(t.dataset.z))")
    assert z == round_floats(head["z"])
    assert page.eval_on_selector_all("#prompt-strip .tok[data-peak]", "ts => ts.map(t => Number(t.dataset.i))") == [3]
    assert f"head #{head['id']} at token 3" in page.inner_text("#prompt-strip-label")
