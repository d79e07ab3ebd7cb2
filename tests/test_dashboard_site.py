"""The dashboard site: the data writer (layout, numbers, contract errors, atomic builds) and the pages in a real
browser opened from disk (file://): header, histogram, the virtualized feature table (sort, filter, search,
keyboard), feature pages with the exact token values, Lorsa z-patterns, the comparison page, and a 36,864-feature
site. Any console error or warning fails a browser test."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from dashboard_browser import WatchedPage, launch, read_payload
from dashboard_data import AWKWARD, SyntheticDashboard, synthetic_compare
from ranklens.dashboard import write_compare, write_site
from ranklens.dashboard.site_writer import MARKER, round_floats, to_json
from ranklens.errors import RanklensError

N_SAE, N_LORSA = 300, 120
SKIPPED = 7  # an SAE feature with an index row but no record


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sae():
    return SyntheticDashboard("sae", N_SAE, skip_records=frozenset({SKIPPED}))


@pytest.fixture(scope="module")
def lorsa():
    return SyntheticDashboard("lorsa", N_LORSA, n_top=6, quantiles=2, examples=2)


@pytest.fixture(scope="module")
def sites(tmp_path_factory, sae, lorsa):
    root = tmp_path_factory.mktemp("dash")
    write_site(root / "sae", sae.meta(), sae.index_rows(), sae.features(), chunk_size=64, index_chunk_rows=128)
    write_site(root / "lorsa", lorsa.meta(), lorsa.index_rows(), lorsa.features(), chunk_size=32)
    write_compare(root / "compare", synthetic_compare(N_SAE, N_LORSA, site_href_a="../sae/",
                                                      site_href_b="../lorsa"))
    return root


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


def open_index(w: WatchedPage, site: Path, hash_: str = ""):
    page = w.page
    page.goto((site / "index.html").as_uri() + hash_)
    page.wait_for_selector("body[data-ready='1']")
    return page


def visible_ids(page) -> list[int]:
    """Ids of the rendered table rows in display order."""
    return page.eval_on_selector_all(
        "#feature-table .vt-body .vt-row",
        "rows => rows.map(r => [Number(r.dataset.pos), Number(r.dataset.id)]).sort((a, b) => a[0] - b[0])"
        ".map(p => p[1])")


def count_text(page) -> str:
    return page.inner_text("#table-count")


def wait_count(page, shown: int, total: int) -> None:
    page.wait_for_function(
        "([s, t]) => document.getElementById('table-count').textContent === "
        "`showing ${s.toLocaleString('en-US')} of ${t.toLocaleString('en-US')}`", arg=[shown, total])


def fill(page, selector: str, text: str) -> None:
    """Type into a filter box and apply it at once (Enter) instead of after the typing pause."""
    page.fill(selector, text)
    page.press(selector, "Enter")


def rounded(values):
    return round_floats(values)


# --------------------------------------------------------------------------- the writer


def test_round_floats_and_json_numbers():
    assert round_floats([0.123456789, 123456.7, 1e-7, 3.0, -2.5e-12, 0.0, 1 / 3]) == [
        0.12346, 123460, 1e-07, 3, -2.5e-12, 0, 0.33333]
    assert round_floats([float("nan"), float("inf"), -float("inf"), None]) == [None, None, None, None]
    long = np.linspace(-5, 5, 101) * math.pi  # the vectorized path
    assert round_floats(long) == [float(f"{x:.4e}") if not float(f"{x:.4e}").is_integer() else int(float(f"{x:.4e}"))
                                  for x in long]
    assert to_json({"a": 7, "b": True, "c": np.float32(0.5), "d": np.int64(3), "e": [1, 2.25, None], "f": np.arange(3)}) \
        == {"a": 7, "b": True, "c": 0.5, "d": 3, "e": [1, 2.25, None], "f": [0, 1, 2]}
    assert isinstance(to_json(7), int) and to_json(True) is True
    assert to_json({"p": Path("runs/x"), "t": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)}) == {
        "p": "runs/x", "t": "2026-01-02T03:04:05+00:00"}


def test_layout_and_payloads(sites, sae):
    site = sites / "sae"
    assert (site / MARKER).is_file()
    assert {p.name for p in site.iterdir()} == {"index.html", "app.js", "style.css", "data", MARKER}
    data = sorted(p.name for p in (site / "data").iterdir())
    assert data[:3] == ["features-000.js", "features-001.js", "features-002.js"]
    assert [p for p in data if p.startswith("index-")] == ["index-000.js", "index-001.js", "index-002.js"]
    kind, key, manifest = read_payload(site / "data" / "meta.js")
    assert (kind, key) == ("meta", None)
    meta = manifest["meta"]
    assert meta["format"] == "ranklens.dashboard/1" and meta["n_features"] == N_SAE
    assert meta["metrics"]["nan_metric"] is None and meta["metrics"]["inf_metric"] is None
    assert meta["metrics"]["k"] == 32 and meta["metrics"]["fvu"] == 0.12346
    assert manifest["n_records"] == N_SAE - 1 and manifest["n_missing_records"] == 1
    assert manifest["files"]["feature_chunk_size"] == 64
    assert list(manifest["files"]["features"]) == ["0", "1", "2", "3", "4"]
    # the index, column-wise with interned tokens
    _, c, part = read_payload(site / "data" / "index-001.js")
    assert c == 1 and part["start"] == 128 and part["n"] == 128
    row = sae.summary(130)
    cols = part["columns"]
    assert cols["id"][2] == 130 and cols["density"][2] == rounded([row["density"]])[0]
    assert [part["vocab"][t] for t in cols["top_tokens"][2]] == row["top_tokens"]
    # a dead feature: mean_act NaN -> null, alive 0
    dead = next(f for f in range(128, 256) if sae.is_dead(f))
    assert cols["mean_act"][dead - 128] is None and cols["alive"][dead - 128] == 0
    # feature records: contexts as [token ids, acts, peak, doc, pos]
    _, k, chunk = read_payload(site / "data" / "features-000.js")
    assert k == 0 and [f["id"] for f in chunk["features"]] == [i for i in range(64) if i != SKIPPED]
    rec, src = chunk["features"][0], sae.record(0)
    ctx, want = rec["top"][0], src["top"][0]
    assert [chunk["vocab"][t] for t in ctx[0]] == want["tokens"]
    assert ctx[1] == rounded(want["acts"]) and ctx[2:] == [want["peak"], want["doc"], want["pos"]]
    assert all(isinstance(a, int) for a, b in zip(ctx[1], want["acts"], strict=True) if b == 0)
    assert rec["logits"]["promoted"][0] == [src["logits"]["promoted"][0][0], rounded([src["logits"]["promoted"][0][1]])[0]]
    text = (site / "data" / "features-000.js").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_contract_errors(tmp_path, sae):
    meta, rows = sae.meta(), sae.index_rows()

    def build(features, m=meta, r=rows):
        return write_site(tmp_path / "site", m, r, features, chunk_size=64)

    def rec(fid, **change):
        out = sae.record(fid)
        out.update(change)
        return out

    with pytest.raises(ValueError, match=r"unknown keys \['neighbors'\]"):
        build([rec(0, neighbors=[])])
    bad = rec(0)
    bad["top"][0]["acts"] = bad["top"][0]["acts"][:-1]
    with pytest.raises(ValueError, match="32 tokens but 31 acts"):
        build([bad])
    bad = rec(0)
    bad["top"][1]["peak"] = 32
    with pytest.raises(ValueError, match=r"top\[1\].*peak 32"):
        build([bad])
    with pytest.raises(ValueError, match="no index row"):
        build([rec(0, id=N_SAE + 5)])
    with pytest.raises(ValueError, match="a second record"):
        build([sae.record(0), sae.record(0)])
    with pytest.raises(ValueError, match="n_features is"):
        build([], r=rows[:-1])
    with pytest.raises(ValueError, match="n_dead is"):
        build([], m={**meta, "n_dead": 0})
    with pytest.raises(ValueError, match="missing keys"):
        build([], m={k: v for k, v in meta.items() if k != "logit_note"})
    with pytest.raises(ValueError, match='"lorsa" block'):
        build([rec(0, lorsa={"qk_group": 1})])
    assert not (tmp_path / "site").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary build left behind


def _temp_dirs(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_failed_build_keeps_previous_site(tmp_path):
    small = SyntheticDashboard("sae", 200)
    out = write_site(tmp_path / "site", small.meta(), small.index_rows(), small.features(), chunk_size=32)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def failing():
        for i, r in enumerate(small.features()):
            if i == 150:  # after four chunks were written
                raise RuntimeError("the statistics pass died")
            yield r

    with pytest.raises(RuntimeError, match="died"):
        write_site(tmp_path / "site", small.meta(), small.index_rows(), failing(), chunk_size=32)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert _temp_dirs(tmp_path, "site") == []


def test_killed_build_leaves_previous_site_and_is_cleaned_up(tmp_path):
    small = SyntheticDashboard("sae", 200)
    out = write_site(tmp_path / "site", small.meta(), small.index_rows(), small.features(), chunk_size=32)
    meta_before = (out / "data" / "meta.js").read_bytes()
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from dashboard_data import SyntheticDashboard
        from ranklens.dashboard import write_site
        s = SyntheticDashboard("sae", 200, title="second build")
        def slow():
            for i, r in enumerate(s.features()):
                if i == 100:
                    Path({str(ready)!r}).write_text("1")
                    time.sleep(600)
                yield r
        write_site({str(tmp_path / "site")!r}, s.meta(), s.index_rows(), slow(), chunk_size=32)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "the build exited early"
            assert time.monotonic() < deadline, "the build never got going"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (out / "data" / "meta.js").read_bytes() == meta_before  # the old site, untouched
    stale = _temp_dirs(tmp_path, "site")
    assert len(stale) == 1 and stale[0].startswith(f".site.building-{proc.pid}-")
    assert not (tmp_path / stale[0] / MARKER).exists()  # never marked complete
    assert (tmp_path / stale[0] / "data" / "features-000.js").is_file()  # it was half-way
    again = SyntheticDashboard("sae", 200, title="third build")
    write_site(tmp_path / "site", again.meta(), again.index_rows(), again.features(), chunk_size=32)
    assert _temp_dirs(tmp_path, "site") == []
    assert read_payload(out / "data" / "meta.js")[2]["meta"]["title"] == "third build"


def test_site_left_aside_by_a_killed_swap_is_restored(tmp_path):
    small = SyntheticDashboard("sae", 50)
    out = write_site(tmp_path / "site", small.meta(), small.index_rows(), small.features())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    aside = tmp_path / f".site.old-{int(dead.stdout)}-abcd1234"
    os.rename(out, aside)  # killed between the two renames of a swap

    def failing():
        raise RuntimeError("fails before any record")
        yield  # pragma: no cover

    with pytest.raises(RuntimeError):
        write_site(tmp_path / "site", small.meta(), small.index_rows(), failing())
    assert (out / MARKER).is_file() and (out / "index.html").is_file()
    assert _temp_dirs(tmp_path, "site") == []


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    small = SyntheticDashboard("sae", 10)
    with pytest.raises(RanklensError, match="not a ranklens dashboard"):
        write_site(foreign, small.meta(), small.index_rows(), small.features())
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert _temp_dirs(tmp_path, "mine") == []


def test_compare_refuses_script_links(tmp_path):
    data = synthetic_compare(10, 10, site_href_a="javascript:alert(1)")
    with pytest.raises(ValueError, match="site_href must be a relative path"):
        write_compare(tmp_path / "cmp", data)


def test_missing_chromium_skips_or_fails(monkeypatch, tmp_path):
    import dashboard_browser

    monkeypatch.setattr(dashboard_browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("RANKLENS_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium is missing"):
        dashboard_browser.launch()
    monkeypatch.setenv("RANKLENS_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="RANKLENS_REQUIRE_BROWSER=1 but"):
        dashboard_browser.launch()


# --------------------------------------------------------------------------- the index page


def test_index_page_header_and_histogram(watched, sites, sae):
    page = open_index(watched, sites / "sae")
    meta = sae.meta()
    assert page.inner_text("#title") == meta["title"]
    stats = page.inner_text("#header-stats")
    assert "300" in stats and f"{meta['n_dead']} ({meta['n_dead'] / N_SAE * 100:.2f}%)" in stats
    assert "1,000,000" in stats and "576" in stats
    assert meta["dead_definition"] in page.inner_text("#site-header")
    metrics = page.inner_text("#metrics")
    assert "fvu" in metrics and "0.1235" in metrics and "sparseadam" in metrics and "n/a" in metrics
    bars = page.locator("#density-histogram svg rect.bar")
    assert bars.count() == len(meta["density_histogram"]["counts"])
    assert "SAE" in page.inner_text("#load-status") and "L3.attn_out" in page.inner_text("#load-status")
    wait_count(page, N_SAE, N_SAE)
    rows = page.locator("#feature-table .vt-body .vt-row").count()
    assert 0 < rows < 60  # virtualized: only what is visible (plus a margin)
    assert visible_ids(page)[:5] == [0, 1, 2, 3, 4]
    assert page.locator("#prompt-form").is_hidden()
    assert "ranklens serve DIR" in page.inner_text("#prompt-note")
    assert page.evaluate("window.__xss") is None


def test_sort_filter_search(watched, sites, sae):
    page = open_index(watched, sites / "sae")
    rows = sae.index_rows()
    dens = {r["id"]: r["density"] for r in rows}

    page.click("button[data-sort='density']")
    want = sorted(dens, key=lambda i: (-dens[i], i))
    assert visible_ids(page)[:10] == want[:10]
    assert page.get_attribute("[role=columnheader]:has(button[data-sort='density'])", "aria-sort") == "descending"
    page.click("button[data-sort='density']")
    want = sorted(dens, key=lambda i: (dens[i], i))
    assert visible_ids(page)[:10] == want[:10]
    assert page.get_attribute("[role=columnheader]:has(button[data-sort='density'])", "aria-sort") == "ascending"

    mean = {r["id"]: r["mean_act"] for r in rows}
    page.click("button[data-sort='mean_act']")  # NaN (dead) rows last
    want = sorted((i for i in mean if not math.isnan(mean[i])), key=lambda i: (-rounded([mean[i]])[0], i))
    assert visible_ids(page)[:10] == want[:10]

    n_dead = sum(1 for r in rows if not r["alive"])
    page.select_option("#filter-alive", "dead")
    wait_count(page, n_dead, N_SAE)
    assert page.locator("#feature-table .vt-row .badge.alive").count() == 0
    page.select_option("#filter-alive", "alive")
    wait_count(page, N_SAE - n_dead, N_SAE)
    fill(page, "#filter-min", "1e-4")
    fill(page, "#filter-max", "0.01")
    want_n = sum(1 for r in rows if r["alive"] and 1e-4 <= rounded([r["density"]])[0] <= 0.01)
    wait_count(page, want_n, N_SAE)
    fill(page, "#filter-max", "abc")
    page.wait_for_selector("#filter-error:not([hidden])")
    assert "not a number" in page.inner_text("#filter-error")
    fill(page, "#filter-max", "")
    fill(page, "#filter-min", "")
    page.select_option("#filter-alive", "all")
    wait_count(page, N_SAE, N_SAE)
    assert page.locator("#filter-error").is_hidden()

    fill(page, "#search", "MAT")  # case-insensitive substring of a top token
    want = [r["id"] for r in rows if any("mat" in t.lower() for t in r["top_tokens"])]
    wait_count(page, len(want), N_SAE)
    fill(page, "#search", "17")  # an id, or "17" inside a token
    want = [r["id"] for r in rows if r["id"] == 17 or any("17" in t for t in r["top_tokens"])]
    wait_count(page, len(want), N_SAE)
    assert 17 in visible_ids(page)
    fill(page, "#search", "<script>")
    wait_count(page, 1, N_SAE)
    assert visible_ids(page) == [0]
    assert page.inner_text("#feature-table .vt-row[data-id='0'] .chip >> nth=0") == AWKWARD[0]
    fill(page, "#search", "\\n")  # a typed \n finds newline tokens
    want = [r["id"] for r in rows if any("\n" in t for t in r["top_tokens"])]
    wait_count(page, len(want), N_SAE)


def test_keyboard_navigation_and_back_button(watched, sites, sae):
    page = open_index(watched, sites / "sae")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "search"
    page.keyboard.press("ArrowDown")  # from the search box into the table
    assert page.evaluate("document.activeElement.dataset.id") == "0"
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    assert page.evaluate("document.activeElement.dataset.id") == "2"
    page.keyboard.press("Enter")
    page.wait_for_selector("#feature-title")
    assert page.url.endswith("#feature=2")
    assert page.inner_text("#feature-title").startswith("Feature 2")
    page.keyboard.press("ArrowRight")  # the next feature in the table's order
    page.wait_for_function("document.getElementById('feature-title') && "
                           "document.getElementById('feature-title').textContent.startsWith('Feature 3')")
    assert page.url.endswith("#feature=3")
    page.keyboard.press("Escape")
    page.wait_for_function("location.hash === '#feature=2'")
    page.keyboard.press("Escape")
    page.wait_for_selector("#overview-view:not([hidden])")
    assert page.evaluate("document.activeElement.dataset.id") == "2"  # focus back on the row
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.dataset.id") == str(N_SAE - 1)
    page.keyboard.press("Home")
    assert page.evaluate("document.activeElement.dataset.id") == "0"

    page.click("#feature-table .vt-row[data-id='5']")
    page.wait_for_selector("#feature-title")
    assert page.url.endswith("#feature=5")
    page.go_back()
    page.wait_for_selector("#overview-view:not([hidden])")
    assert page.locator("#feature-view").is_hidden()
    page.go_forward()
    page.wait_for_selector("#feature-title")
    page.keyboard.press("/")  # from a feature: back to the table's search
    page.wait_for_selector("#overview-view:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "search"


# --------------------------------------------------------------------------- feature pages


def context_values(page, selector: str) -> list[dict]:
    return page.eval_on_selector_all(selector, """ctxs => ctxs.map(c => ({
        doc: Number(c.dataset.doc), pos: Number(c.dataset.pos),
        tokens: [...c.querySelectorAll('.tok[data-act]')].map(t => t.textContent),
        acts: [...c.querySelectorAll('.tok[data-act]')].map(t => t.dataset.act === 'null' ? null : Number(t.dataset.act)),
        titles: [...c.querySelectorAll('.tok[data-act]')].map(t => t.title),
        z: [...c.querySelectorAll('.tok[data-z]')].map(t => t.dataset.z === 'null' ? null : Number(t.dataset.z)),
        peaks: [...c.querySelectorAll('.tok[data-act][data-peak]')].map(t =>
            [...c.querySelectorAll('.tok[data-act]')].indexOf(t)),
    }))""")


def shown(token: str) -> str:
    """How the page writes a token inside a context: whitespace and invisible characters as symbols."""
    symbols = {"\n": "\u21b5", "\t": "\u21e5", "\r": "\\r"}
    if token is None:
        return "\u2205"
    if token and set(token) == {" "}:
        return "\u2423" * len(token)
    out = ""
    for ch in token:
        if ch in symbols:
            out += symbols[ch]
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or ch in "\u200b":
            out += f"\\u{ord(ch):04x}"
        else:
            out += ch
    return out


def test_feature_page_shows_the_exact_values(watched, sites, sae):
    page = open_index(watched, sites / "sae")
    page.click("#feature-table .vt-row[data-id='0']")
    page.wait_for_selector("#top-contexts .ctx")
    assert page.url.endswith("#feature=0")
    rec = sae.record(0)
    got = context_values(page, "#top-contexts .ctx")
    assert len(got) == len(rec["top"]) == 20
    for g, want in zip(got, rec["top"], strict=True):
        assert g["tokens"] == [shown(t) for t in want["tokens"]]
        assert g["acts"] == rounded(want["acts"])  # exactly the numbers of the data file
        assert g["acts"] == pytest.approx(want["acts"], rel=1e-4, abs=1e-12)  # and those the writer got
        assert g["peaks"] == [want["peak"]]
        assert (g["doc"], g["pos"]) == (want["doc"], want["pos"])
        assert g["z"] == []
    first = got[0]
    assert got[1]["tokens"][0] == "\u2205" and "outside the document" in got[1]["titles"][0]
    assert AWKWARD[0] in first["tokens"]  # markup shown as text ...
    assert page.evaluate("window.__xss") is None  # ... never run
    assert str(rounded(rec["top"][0]["acts"])[rec["top"][0]["peak"]]) in first["titles"][rec["top"][0]["peak"]]
    stats = page.inner_text("#feature-stats")
    assert "5.413" in stats or str(round(rec["max_act"], 3))[:4] in stats
    assert "Subspace share (dim 64)" in stats or "SUBSPACE SHARE (DIM 64)" in stats.upper()
    # quantile intervals
    labels = page.eval_on_selector_all("#quantiles .quantile", "qs => qs.map(q => q.dataset.label)")
    assert labels == [q["label"] for q in rec["quantiles"]]
    q2 = context_values(page, "#quantiles .quantile >> nth=1 >> .ctx")
    assert [g["acts"] for g in q2] == [rounded(e["acts"]) for e in rec["quantiles"][1]["examples"]]
    # logit effects, escaped, with the note
    promoted = page.eval_on_selector_all("#logits table.promoted tbody tr", "rs => rs.map(r => "
                                         "[r.cells[0].textContent, Number(r.cells[1].dataset.value)])")
    assert promoted[0][0] == "<img\u00b7src=x\u00b7onerror=window.__xss=2>"
    assert [v for _, v in promoted] == rounded([v for _, v in rec["logits"]["promoted"]])
    assert page.locator("#logits .chart svg rect.bar").count() == 40
    assert sae.meta()["logit_note"] in page.inner_text("#logits .logit-note")
    assert page.locator("#act-histogram svg rect.bar").count() == 30
    # nearest features link to their pages
    nb = rec["neighbours"][0][0]
    page.click(f"#neighbours a[data-feature='{nb}']")
    page.wait_for_function(f"document.getElementById('feature-title') && "
                           f"document.getElementById('feature-title').textContent.startsWith('Feature {nb}')")
    assert page.url.endswith(f"#feature={nb}")


def test_dead_missing_and_unknown_features(watched, sites, sae):
    dead = next(f for f in range(N_SAE) if sae.is_dead(f))
    page = open_index(watched, sites / "sae", f"#feature={dead}")
    page.wait_for_selector("#top-contexts")
    assert "never fired" in page.inner_text("#top-contexts")
    assert page.locator("#feature-title .badge.dead").count() == 1
    page.evaluate(f"location.hash = 'feature={SKIPPED}'")
    page.wait_for_selector("#no-record")
    assert "No detail record" in page.inner_text("#no-record")
    page.evaluate("location.hash = 'feature=99999'")
    page.wait_for_function("document.getElementById('feature-status') && "
                           "document.getElementById('feature-status').textContent.includes('no feature 99999')")


def test_lorsa_head_z_pattern_and_attribution(watched, sites, lorsa):
    page = open_index(watched, sites / "lorsa")
    assert page.inner_text("#table-heading") == "Lorsa heads"
    page.click("button[data-sort='qk_group']")
    assert visible_ids(page)[0] >= N_LORSA - lorsa.heads_per_group  # the largest group first
    page.fill("#search", "9")
    page.keyboard.press("Enter")  # apply now and move into the table
    page.keyboard.press("Enter")
    page.wait_for_selector("#top-contexts .ctx")
    hid = int(page.url.rsplit("=", 1)[1])
    rec = lorsa.record(hid)
    got = context_values(page, "#top-contexts .ctx")
    assert len(got) == len(rec["top"])
    for g, want in zip(got, rec["top"], strict=True):
        assert g["acts"] == rounded(want["acts"])
        assert g["z"] == rounded(want["z"])
        assert g["z"] == pytest.approx(want["z"], rel=1e-4, abs=1e-12)
        assert g["peaks"] == [want["peak"]]
    peak_z = page.eval_on_selector_all("#top-contexts .ctx >> nth=0 >> .tok[data-z][data-peak]", "e => e.length")
    assert peak_z == 1
    assert page.inner_text("#qk-group") == str(rec["lorsa"]["qk_group"])
    assert page.inner_text("#heads-90") == str(rec["lorsa"]["heads_for_90pct"])
    bars = page.eval_on_selector_all(".bar-row", "rs => rs.map(r => [r.dataset.head, Number(r.dataset.share)])")
    assert bars == [[label, rounded([share])[0]] for label, share in rec["lorsa"]["attribution"]]
    z_quant = context_values(page, "#quantiles .ctx >> nth=0")
    assert z_quant[0]["z"] == rounded(rec["quantiles"][0]["examples"][0]["z"])


# --------------------------------------------------------------------------- comparison page


def test_compare_page(watched, sites):
    data = synthetic_compare(N_SAE, N_LORSA, site_href_a="../sae/", site_href_b="../lorsa")
    page = watched.page
    page.goto((sites / "compare" / "compare.html").as_uri())
    page.wait_for_selector("body[data-ready='1']")
    runs = page.inner_text("#compare-runs")
    assert data["a"]["title"] in runs and data["b"]["title"] in runs
    a_share = f"{data['a']['n_dead'] / N_SAE * 100:.2f}%"
    assert page.inner_text("#compare-runs tr[data-run='a'] .dead-share") == a_share
    for box in ("#compare-density", "#compare-subspace"):  # same axes side by side
        ticks = page.eval_on_selector_all(f"{box} figure", "fs => fs.map(f => [...f.querySelectorAll('text.tick')]"
                                                           ".map(t => t.textContent).join('|'))")
        assert len(ticks) == 2 and ticks[0] == ticks[1]
    assert page.locator("#compare-cosine svg rect.bar").count() == len(data["cosine_histogram"]["counts"])
    assert page.inner_text("#pairs-count") == f"{N_SAE} pairs"
    page.click("#pairs-table button[data-sort='cos']")  # highest cosine first, null last
    cos = page.eval_on_selector_all("#pairs-table .vt-row [data-cos]", "e => e.map(x => Number(x.dataset.cos))")
    pairs = sorted((p for p in data["pairs"] if p[2] == p[2]), key=lambda p: (-rounded([p[2]])[0], p[0]))
    assert cos[:8] == [rounded([p[2]])[0] for p in pairs[:8]]
    first = pairs[0]
    link = page.locator(f"#pairs-table .vt-row[data-id='{first[0]}'] a").first
    assert link.get_attribute("href") == f"../sae/index.html#feature={first[0]}"
    b_link = page.locator(f"#pairs-table .vt-row[data-id='{first[0]}'] a").nth(1)
    assert b_link.get_attribute("href") == f"../lorsa/index.html#feature={first[1]}"
    link.click()
    page.wait_for_selector("#top-contexts")
    assert page.url.endswith(f"/sae/index.html#feature={first[0]}")


# --------------------------------------------------------------------------- 36,864 features


BIG = 36_864


def big_rows_and_records():
    """A 36,864-feature SAE made fast (vectorized): full index rows, light records (two contexts of 32 tokens).
    The size of full records (20 contexts) is measured by scripts/dashboard_scale.py."""
    rng = np.random.default_rng(5)
    density = 10 ** rng.uniform(-6, -1, BIG)
    dead = rng.random(BIG) < 0.04
    density[dead] = 0
    max_act = rng.gamma(3, 2, BIG) + 0.5
    share = rng.beta(4, 2, BIG)
    vocab = [" the", " cat", ",", "\n", " model", " of", " rank", " space", "ing", " sat"]
    toks = rng.integers(0, len(vocab), (BIG, 5))
    rows = [{"id": i, "density": float(density[i]), "mean_act": float(max_act[i] * 0.3), "max_act": float(max_act[i]),
             "alive": bool(not dead[i]), "subspace_share": float(share[i]),
             "top_tokens": [f"{vocab[t]}{i % 97}" for t in toks[i]]} for i in range(BIG)]
    meta = SyntheticDashboard("sae", 1).meta()
    meta.update(n_features=BIG, n_dead=int(dead.sum()), title="SAE 64x synthetic (36,864 features)")
    del meta["density_histogram"]  # computed by the writer

    def records():
        for r in rows:
            ctx = [{"tokens": [vocab[(r["id"] + j) % len(vocab)] for j in range(32)],
                    "acts": [0.0] * 31 + [r["max_act"]], "peak": 31, "doc": r["id"], "pos": j} for j in range(2)]
            yield {k: r[k] for k in ("id", "density", "mean_act", "max_act", "alive")} | {"top": ctx}

    return meta, rows, records


def test_36864_feature_site_loads_and_sorts(watched, tmp_path):
    meta, rows, records = big_rows_and_records()
    site = write_site(tmp_path / "big", meta, rows, records())
    index_files = sorted((site / "data").glob("index-*.js"))
    assert len(index_files) == 5
    sizes = [p.stat().st_size for p in index_files]
    assert sum(sizes) < 4_500_000 and max(sizes) < 1_000_000, sizes  # the table loads in one go
    assert len(list((site / "data").glob("features-*.js"))) == BIG // 256
    manifest = read_payload(site / "data" / "meta.js")[2]
    assert sum(manifest["meta"]["density_histogram"]["counts"]) == BIG - meta["n_dead"]

    page = open_index(watched, site)
    wait_count(page, BIG, BIG)
    assert page.locator("#feature-table .vt-body .vt-row").count() < 60
    page.click("button[data-sort='density']")
    dens = np.array(round_floats([r["density"] for r in rows]), dtype=float)
    assert visible_ids(page)[:5] == sorted(range(BIG), key=lambda i: (-dens[i], i))[:5]
    page.click("#feature-table .vt-row >> nth=0")
    page.keyboard.press("Escape")
    page.wait_for_selector("#overview-view:not([hidden])")
    page.focus("#feature-table .vt-row[tabindex='0']")
    page.keyboard.press("End")
    last = sorted(range(BIG), key=lambda i: (-dens[i], i))[-1]
    assert page.evaluate("document.activeElement.dataset.id") == str(last)
    assert page.locator("#feature-table .vt-body .vt-row").count() < 60
    page.keyboard.press("Enter")
    page.wait_for_selector("#top-contexts .ctx")
    assert page.url.endswith(f"#feature={last}")
    page.evaluate(f"location.hash = 'feature={BIG - 1}'")  # the last data file
    page.wait_for_function(f"document.getElementById('feature-title') && "
                           f"document.getElementById('feature-title').textContent.startsWith('Feature {BIG - 1}') && "
                           f"document.querySelectorAll('#top-contexts .ctx').length === 2")
