"""Screenshots of the feature dashboard for the docs: docs/images/dashboard-index.png and dashboard-feature.png.

    python scripts/dashboard_screenshots.py                          # a synthetic SAE site, built in a temp dir
    python scripts/dashboard_screenshots.py --site runs/x/dashboard --feature 123   # a real site

Drives Debian's Chromium (/usr/bin/chromium) with Playwright, at a laptop-sized viewport. Tokens in scripts the
machine has no font for (CJK, emoji) come out as boxes: `apt-get install fonts-noto-cjk fonts-noto-color-emoji`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def synthetic_site(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from dashboard_data import SyntheticDashboard
    from ranklens.dashboard import write_site

    s = SyntheticDashboard("sae", 4096, title="SAE L3.attn_out, 8x TopK (synthetic data)")
    return write_site(out, s.meta(), s.index_rows(), s.features())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", type=Path, help="a written dashboard site (default: build a synthetic one)")
    ap.add_argument("--feature", type=int, default=1, help="the feature to show on the feature page")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--width", type=int, default=1366)
    ap.add_argument("--height", type=int, default=860)
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    fonts = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, check=False).stdout
    if shutil.which("fc-list") and not fonts.strip():
        print("note: no CJK font installed; such tokens will show as boxes", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site if args.site else synthetic_site(Path(tmp) / "site")
        args.out.mkdir(parents=True, exist_ok=True)
        problems: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto((site.resolve() / "index.html").as_uri())
            page.wait_for_selector("body[data-ready='1']")
            page.click("button[data-sort='density']")
            page.mouse.move(0, 0)
            page.screenshot(path=str(args.out / "dashboard-index.png"))
            page.evaluate(f"location.hash = 'feature={args.feature}'")
            page.wait_for_selector("#feature-stats")
            page.wait_for_timeout(200)
            page.set_viewport_size({"width": args.width, "height": int(args.height * 1.5)})
            page.screenshot(path=str(args.out / "dashboard-feature.png"))
            browser.close()
        if problems:
            sys.exit("console errors: " + "; ".join(problems))
    for name in ("dashboard-index.png", "dashboard-feature.png"):
        print(args.out / name)


if __name__ == "__main__":
    main()
