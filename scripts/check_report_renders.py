"""Render a report page in headless Chromium (Debian's `chromium`) and check that plotly drew it.

    python scripts/check_report_renders.py [plots/report.html] [--screenshot report.png]

Counts the plotly figures in the DOM after the page's scripts ran (one <svg class="main-svg"> or more
per figure) and saves a screenshot to look at. Exits 1 when fewer figures drew than the page holds.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("page", nargs="?", default="plots/report.html")
    parser.add_argument("--screenshot", default="plots/report.png")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    url = Path(args.page).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        subprocess.run([*common, "--window-size=1280,3400", f"--screenshot={args.screenshot}", url],
                       capture_output=True, timeout=120)
    expected = Path(args.page).read_text().count("Plotly.newPlot")
    drawn = len(re.findall(r'<div[^>]*class="[^"]*js-plotly-plot', dom))  # plotly marks each div it drew
    print(f"{args.page}: {drawn} of {expected} plotly figures drawn; screenshot: {args.screenshot}")
    return 0 if expected and drawn >= expected else 1


if __name__ == "__main__":
    sys.exit(main())
