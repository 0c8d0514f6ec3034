"""Headless Chromium (Debian's `chromium` package) to render the browser's pages from disk: the DOM
after its JavaScript ran, or a screenshot. Used by the tests, the benchmark and the README screenshot:

    python -m evaluate.browser.chromium screenshot 'runs/x/features/index.html#latent=12' docs/shot.png
    python -m evaluate.browser.chromium dom 'runs/x/features/index.html#latent=12'
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Without the networking switches Chromium waits on services it cannot reach on a closed network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
         "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio",
         "--allow-file-access-from-files")


class ChromiumError(RuntimeError):
    pass


def find_chromium() -> Optional[str]:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def file_url(page: str | Path) -> str:
    """file:// URL of a local page, keeping a #fragment."""
    text = str(page)
    path, _, fragment = text.partition("#")
    url = Path(path).resolve().as_uri()
    return url + ("#" + fragment if fragment else "")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    binary = find_chromium()
    if binary is None:
        raise ChromiumError("no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/it)")
    with tempfile.TemporaryDirectory(prefix="jumpscope-chromium-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ChromiumError(f"chromium did not finish in {timeout:.0f} s: {' '.join(cmd)}") from e
    if done.returncode != 0:
        raise ChromiumError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return done


def dump_dom(page: str | Path, budget_ms: int = 10_000, timeout: float = 120, size: str = "1400,900") -> str:
    """The page's DOM (HTML) once its scripts, including those they load, have run. The virtual-time
    budget lets every timer and script load finish before the dump, however slow the machine."""
    return _run([f"--window-size={size}", f"--virtual-time-budget={budget_ms}", "--dump-dom", file_url(page)],
                timeout).stdout


def screenshot(page: str | Path, out: str | Path, size: str = "1400,900", budget_ms: int = 10_000,
               timeout: float = 120) -> Path:
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--window-size={size}", f"--virtual-time-budget={budget_ms}", "--run-all-compositor-stages-before-draw",
          f"--screenshot={out}", file_url(page)], timeout)
    if not out.is_file():
        raise ChromiumError(f"chromium wrote no screenshot to {out}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("dom")
    d.add_argument("page")
    s = sub.add_parser("screenshot")
    s.add_argument("page")
    s.add_argument("out")
    s.add_argument("--size", default="1400,900", help="window width,height in pixels")
    a = p.parse_args(argv)
    try:
        if a.what == "dom":
            sys.stdout.write(dump_dom(a.page))
        else:
            print(screenshot(a.page, a.out, a.size))
    except ChromiumError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
