"""Headless Chromium for the dashboard tests: Debian's /usr/bin/chromium driven by Playwright (never a browser that
Playwright downloads). Without Chromium the browser tests skip, unless RANKLENS_REQUIRE_BROWSER=1 (CI), where they
fail. Every page records its console messages and page errors; ``check`` fails on any error or warning."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _unavailable(reason: str) -> None:
    if os.environ.get("RANKLENS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"RANKLENS_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def launch():
    """(playwright, browser); skips (or fails, see above) when Chromium or Playwright is missing."""
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    except Exception:
        pw.stop()
        raise
    return pw, browser


class WatchedPage:
    """A page in a fresh browser context that records console errors/warnings and page errors."""

    def __init__(self, browser, *, width: int = 1366, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.problems: list[str] = []
        self.allowed: list[re.Pattern] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda err: self.problems.append(f"page error: {err}"))

    def _console(self, msg) -> None:
        if msg.type in ("error", "warning", "assert"):
            text = msg.text
            if not any(p.search(text) for p in self.allowed):
                self.problems.append(f"console {msg.type}: {text} ({msg.location})")

    def allow(self, pattern: str) -> None:
        """Tolerate console messages matching ``pattern`` (the browser's own network log of an expected 4xx)."""
        self.allowed.append(re.compile(pattern))

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)

    def close(self) -> None:
        self.context.close()


def read_payload(path: Path):
    """(kind, key, payload) of a data file written by site_writer."""
    text = Path(path).read_text(encoding="utf-8")
    m = re.fullmatch(r'window\.RANKLENS\.register\(("[a-z]+"),(null|\d+),(.*)\);\n', text, flags=re.DOTALL)
    assert m, f"{path} is not a data file"
    return json.loads(m.group(1)), json.loads(m.group(2)), json.loads(m.group(3))
