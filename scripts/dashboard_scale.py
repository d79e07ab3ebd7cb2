"""Measure the dashboard at full scale: a synthetic SAE of 36,864 features, each with 20 top contexts of 32 tokens
and 4 activation intervals of 3 examples. Prints the build time, the file sizes and, in headless Chromium, the time
to load the index page, sort and filter the table and open a feature.

    python scripts/dashboard_scale.py [--features 36864] [--keep DIR]

The numbers in docs/dashboard.md come from this script.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=36_864)
    ap.add_argument("--keep", type=Path, help="build the site here and keep it (default: a temporary directory)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from playwright.sync_api import sync_playwright

    from dashboard_data import SyntheticDashboard
    from ranklens.dashboard import write_site

    s = SyntheticDashboard("sae", args.features, title=f"synthetic SAE ({args.features:,} features)")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp) / "site"
        meta, rows = s.meta(), s.index_rows()
        generating = 0.0

        def timed():  # the synthetic records cost time too: keep it out of the writer's
            nonlocal generating
            it = s.features()
            while True:
                t = time.perf_counter()
                try:
                    rec = next(it)
                except StopIteration:
                    return
                finally:
                    generating += time.perf_counter() - t
                yield rec

        t0 = time.perf_counter()
        site = write_site(out, meta, rows, timed())
        elapsed = time.perf_counter() - t0
        data = site / "data"
        index = [p.stat().st_size for p in data.glob("index-*.js")]
        chunks = [p.stat().st_size for p in data.glob("features-*.js")]
        total = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
        print(f"features                 {args.features:,}")
        print(f"write_site               {elapsed - generating:.1f} s (plus {generating:.1f} s generating the data)")
        print(f"site on disk             {mb(total)} in {len(index) + len(chunks) + 1} data files")
        print(f"index (loaded at start)  {mb(sum(index))} in {len(index)} files, largest {mb(max(index))}")
        print(f"feature data files       {len(chunks)}, mean {mb(sum(chunks) // len(chunks))}, largest {mb(max(chunks))}"
              f" ({sum(chunks) / args.features / 1e3:.1f} kB per feature)")

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            t = time.perf_counter()
            page.goto((site / "index.html").as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            print(f"index page ready         {time.perf_counter() - t:.2f} s")
            sort_ms = page.evaluate("""() => { const t = performance.now();
                document.querySelector("button[data-sort='density']").click(); return performance.now() - t; }""")
            print(f"sort by density          {sort_ms:.0f} ms (sort, filter, render)")
            search_ms = page.evaluate("""() => { const s = document.getElementById('search'); s.value = 'the';
                const t = performance.now(); s.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}));
                return performance.now() - t; }""")
            print(f"search 'the'             {search_ms:.0f} ms -> {page.inner_text('#table-count')}")
            rows_in_dom = page.locator("#feature-table .vt-body .vt-row").count()
            print(f"table rows in the DOM    {rows_in_dom}")
            t = time.perf_counter()
            fid = args.features - 1
            page.evaluate(f"location.hash = 'feature={fid}'")
            page.wait_for_selector("#top-contexts .ctx")
            print(f"open feature {fid:<11} {time.perf_counter() - t:.2f} s (loads one data file)")
            browser.close()
        if problems:
            sys.exit("console errors: " + "; ".join(problems))


if __name__ == "__main__":
    main()
