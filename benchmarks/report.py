"""The run report of a large run: writing it, its size, and opening it in headless Chromium.

    python benchmarks/report.py            # a 100,000-action run
    python benchmarks/report.py --quick    # 20,000 actions, for a smoke run
    python benchmarks/report.py --n 1000000

Builds a journaled run of N actions through ``engine.map`` in a temporary
folder, writes its report (``Engine.report``; time and peak RSS of this
process), and opens the page in Debian's ``chromium`` over the DevTools
protocol (``tests/_browser.py``): the load event's time from the page's own
navigation timing, best of five, beside the same browser's time for a blank
page (the floor).  Targets for N = 100,000: the load event in < 2 s, the
file < 2 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import engine
from _browser import Browser, find_chromium


@engine.task
async def leaf(i: int) -> int:
    return i


@engine.task
async def fan(n: int) -> int:
    async with engine.group("leaves"):
        return sum(await engine.map(leaf, range(n), concurrency=1000))


async def build(folder: Path, n: int) -> tuple[Path, float, float]:
    async with engine.Engine(store=folder / "shoal.db", home=folder / ".shoal") as eng:
        started = time.perf_counter()
        run = await eng.run(fan, n)
        ran = time.perf_counter() - started
        started = time.perf_counter()
        path = await eng.report(run.id, folder / "report.html")
        return path, ran, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    n = opts.n or (20_000 if opts.quick else 100_000)
    chromium = find_chromium()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, ran, wrote = asyncio.run(build(folder, n))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        size = path.stat().st_size
        print(f"run of {n + 1:,} actions: {ran:.2f} s; report written in {wrote:.2f} s, "
              f"{size / 1024:,.0f} KiB ({size / 2**20:.2f} MB, target < 2 MB); peak RSS {rss:,.0f} MB")
        if chromium is None:
            print("chromium not found: no load time (apt-get install chromium)")
            return
        blank = folder / "blank.html"
        blank.write_text("<!DOCTYPE html><html><body></body></html>")
        with Browser(chromium) as browser:
            browser.open(blank)  # warm the browser up
            floor = min(browser.open(blank).load_ms for _ in range(opts.rounds))
            pages = [browser.open(path) for _ in range(opts.rounds)]
        errors = sorted({e for p in pages for e in p.errors})
        load = min(p.load_ms for p in pages)
        print(f"load event in chromium: {load:.0f} ms best of {opts.rounds} (target < 2000 ms); "
              f"blank page {floor:.0f} ms; {load / max(floor, 1e-3):.1f}x the blank page")
        if errors:
            print(f"JavaScript errors: {errors}")
            raise SystemExit(1)


if __name__ == "__main__":
    main()
