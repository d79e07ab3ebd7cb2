"""Explanations and scores in the dashboard: a column in the feature table (searchable, the score sortable) and a
section on the feature page, from the data ``attach_autointerp`` writes; headless Chromium from disk (file://)."""

from __future__ import annotations

import pytest

from autointerp_data import write_synthetic_site
from dashboard_browser import WatchedPage, launch
from ranklens.dashboard.site_reader import attach_autointerp


@pytest.fixture(scope="module")
def browser():
    pw, b = launch()
    yield b
    b.close()
    pw.stop()


def _open(browser, site, hash_=""):
    w = WatchedPage(browser)
    w.page.goto((site / "index.html").as_uri() + hash_)
    w.page.wait_for_selector("body[data-ready='1']")
    return w


def test_explanations_show_in_the_table_and_on_the_feature_page(browser, tmp_path):
    site = write_synthetic_site(tmp_path / "site", "lorsa")
    plain = _open(browser, site)
    assert plain.page.locator("text=explanation").count() == 0  # no column before autointerp ran
    plain.check()
    plain.close()
    attach_autointerp(site, {"judge": "judge-x @ http://127.0.0.1:1/v1", "features": {
        "0": {"explanation": "animal <b>names</b>", "z_explanation": "attends to the previous word",
              "scores": {"simulation": 0.61, "simulation_z": 0.2}, "floor": {"simulation": 0.05}},
        "1": {"explanation": "numbers written as digits"}}})
    w = _open(browser, site)
    page = w.page
    assert page.locator("[role=columnheader]", has_text="explanation").count() == 1
    assert page.locator(".explanation", has_text="animal <b>names</b>").count() == 1  # text, never markup
    page.fill("#search", "digits")
    page.wait_for_function("document.querySelectorAll('.vt-row:not(.vt-head)').length === 1")
    page.goto((site / "index.html").as_uri() + "#feature=0")
    page.wait_for_selector("#autointerp")
    assert page.inner_text("#explanation") == "animal <b>names</b>"
    assert "previous word" in page.inner_text("#z-explanation")
    table = page.inner_text("#autointerp-scores")
    assert "0.61" in table and "0.05" in table and "judge-x" in page.inner_text("#autointerp")
    page.goto((site / "index.html").as_uri() + "#feature=2")
    page.wait_for_selector("#feature-stats")
    assert page.locator("#autointerp").count() == 0  # no explanation for this one
    w.check()
    w.close()
