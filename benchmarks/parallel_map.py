"""parallel_map benchmark: speedup on heavy items, overhead on tiny ones, memory of imap.

Run: ``python benchmarks/parallel_map.py`` (``--quick`` measures
ProcessPoolExecutor with chunksize=1 on fewer items and extrapolates; the
full measurement takes over a minute).  Prints one table.

(a) 200 CPU-heavy items (~10 ms of pure Python each): serial vs parallel_map.
(b) 1,000,000 tiny items (x*x): parallel_map with automatic chunking vs
    ProcessPoolExecutor.map at the best chunk size of a small sweep, and at
    chunksize=1.  Peak RSS counts this process and all its children.
(c) parallel_imap over a 10,000,000-item generator: RSS at 1M and at 10M.
(d) As many items as workers, each ~1 s of pure Python: serial vs
    parallel_map (each item should get a worker of its own: ~Nx on N) and
    ProcessPoolExecutor.map.

``--cases`` picks some of them (``--cases ad``).  Times are the best of
three runs (five in (d)).  Both pools are started and warmed up before timing:
parallel_map's pool is reused across calls by design, and the executor is
kept for its sweep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import psutil

import engine

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

TINY_N = 1_000_000
IMAP_N = 10_000_000
HEAVY_N = 200
LONG_SECONDS = 1.0  # per item in (d)
REPEAT = 3  # timings are the best of this many runs
LONG_REPEAT = 5  # in (d), whose few long samples are noisier
SWEEP = (1_000, 5_000, 20_000, 50_000, 125_000)


def heavy(item: tuple[int, int]) -> int:
    x, loops = item
    total = 0
    for i in range(loops):
        total += (i * x) % 7
    return total


def square(x: int) -> int:
    return x * x


def noop(x: int) -> int:
    return x


def calibrate(target: float = 0.010) -> int:
    """Loop count for ``heavy`` to take about ``target`` seconds (fastest of 5 tries)."""
    loops = 10_000
    while True:
        took = min(_time_heavy(loops) for _ in range(5))
        if took > target / 4:
            return int(loops * target / took)
        loops *= 2


def _time_heavy(loops: int) -> float:
    start = time.perf_counter()
    heavy((3, loops))
    return time.perf_counter() - start


def total_rss() -> int:
    me = psutil.Process()
    rss = int(me.memory_info().rss)
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            rss += int(child.memory_info().rss)
    return rss


class PeakRss:
    """Samples this process's and its children's RSS every few ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, total_rss())
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRss:
        self.peak = total_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, total_rss())


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def timed(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    with PeakRss() as rss:
        start = time.perf_counter()
        out = fn()
        took = time.perf_counter() - start
    return took, rss.peak, out


async def atimed(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    with PeakRss() as rss:
        start = time.perf_counter()
        out = await fn()
        took = time.perf_counter() - start
    return took, rss.peak, out


def clocked(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time without the RSS sampler, whose thread would take CPU from the workers."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


async def aclocked(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = await fn()
    return time.perf_counter() - start, out


def _executor_map(ex: ProcessPoolExecutor, chunksize: int) -> list[int]:
    return list(ex.map(square, range(TINY_N), chunksize=chunksize))


@engine.task
async def suite(quick: bool, cases: str = "abcd") -> list[list[str]]:
    rows: list[list[str]] = []
    workers = engine.current_run().engine.worker_pool().max_workers  # type: ignore[union-attr]
    await engine.parallel_map(noop, range(workers * 4))  # start the pool
    loops = calibrate() if "a" in cases or "d" in cases else 0
    if "a" in cases:
        rows += await heavy_items(workers, loops)
    if "b" in cases:
        rows += await tiny_items(workers, quick)
    if "c" in cases:
        rows += await imap_memory()
    if "d" in cases:
        rows += await long_items(workers, loops)
    return rows


async def heavy_items(workers: int, loops: int) -> list[list[str]]:
    """(a) Many items of ~10 ms: parallel_map against serial and ProcessPoolExecutor."""
    rows: list[list[str]] = []
    items = [(i, loops) for i in range(HEAVY_N)]
    # Best of REPEAT, alternating, so a noisy neighbour hurts both sides alike.
    t_serial = t_par = t_ex = float("inf")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        list(ex.map(noop, range(workers * 4)))  # start the executor's processes
        for _ in range(REPEAT):
            t, _, expect = timed(lambda: [heavy(it) for it in items])
            t_serial = min(t_serial, t)
            t, _, got = await atimed(lambda: engine.parallel_map(heavy, items))
            t_par = min(t_par, t)
            assert got == expect
            t, _, got = timed(lambda: list(ex.map(heavy, items)))
            t_ex = min(t_ex, t)
            assert got == expect
    rows.append([f"(a) {HEAVY_N} heavy items, serial", f"{t_serial:.2f} s", "", ""])
    rows.append(
        [
            f"(a) {HEAVY_N} heavy items, parallel_map",
            f"{t_par:.2f} s",
            f"speedup {t_serial / t_par:.2f}x on {workers} workers",
            "",
        ]
    )
    rows.append(
        [
            f"(a) {HEAVY_N} heavy items, ProcessPoolExecutor.map (reference)",
            f"{t_ex:.2f} s",
            f"speedup {t_serial / t_ex:.2f}x",
            "",
        ]
    )
    return rows


async def tiny_items(workers: int, quick: bool) -> list[list[str]]:
    """(b) A million tiny items: automatic chunks against the best executor chunk size."""
    rows: list[list[str]] = []
    ctx = multiprocessing.get_context("spawn")
    expect = [x * x for x in range(TINY_N)]
    t_auto, rss_auto = float("inf"), 0
    for _ in range(REPEAT):
        t, rss, got = await atimed(lambda: engine.parallel_map(square, range(TINY_N)))
        assert got == expect
        del got
        t_auto, rss_auto = min(t_auto, t), max(rss_auto, rss)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        list(ex.map(noop, range(workers * 4)))  # start the executor's processes
        sweep: dict[int, tuple[float, int]] = {}
        for cs in SWEEP:
            best, peak = float("inf"), 0
            for _ in range(REPEAT):
                t, rss, out = timed(functools.partial(_executor_map, ex, cs))
                assert out == expect
                del out
                best, peak = min(best, t), max(peak, rss)
            sweep[cs] = (best, peak)
        best_cs = min(sweep, key=lambda c: sweep[c][0])
        n1 = 20_000 if quick else TINY_N
        t1, rss1, out = timed(lambda: list(ex.map(square, range(n1), chunksize=1)))
        assert out == expect[:n1]
    t1_full = t1 * TINY_N / n1
    t_best = sweep[best_cs][0]
    rows.append(
        [
            f"(b) {TINY_N:,} tiny items, parallel_map auto chunks",
            f"{t_auto:.2f} s",
            f"{t_auto / t_best:.2f}x the best executor time",
            mib(rss_auto),
        ]
    )
    for cs, (t, rss) in sweep.items():
        mark = "  <- best" if cs == best_cs else ""
        rows.append(
            [f"(b) ProcessPoolExecutor.map chunksize={cs:,}{mark}", f"{t:.2f} s", "", mib(rss)]
        )
    label = (
        f"(b) ProcessPoolExecutor.map chunksize=1 (measured on {n1:,}, extrapolated)"
        if quick
        else "(b) ProcessPoolExecutor.map chunksize=1"
    )
    rows.append([label, f"{t1_full:.1f} s", "", mib(rss1) + (f" (at {n1:,})" if quick else "")])
    return rows


async def imap_memory() -> list[list[str]]:
    """(c) parallel_imap over a long generator: memory stays flat."""
    rows: list[list[str]] = []

    def numbers() -> Iterator[int]:
        yield from range(IMAP_N)

    marks: dict[int, int] = {}
    start = time.perf_counter()
    count = 0
    total = 0
    async for value in engine.parallel_imap(square, numbers()):
        total += value
        count += 1
        if count in (1_000_000, IMAP_N):
            marks[count] = total_rss()
    t_imap = time.perf_counter() - start
    assert count == IMAP_N
    rows.append(
        [
            f"(c) parallel_imap over a {IMAP_N:,}-item generator",
            f"{t_imap:.2f} s",
            f"RSS at 1M: {mib(marks[1_000_000])}, at 10M: {mib(marks[IMAP_N])}",
            "",
        ]
    )
    return rows


async def long_items(workers: int, loops: int) -> list[list[str]]:
    """(d) Items = workers, long items: each should run on a worker of its own.

    A lane that queued a second item behind its first (before the other
    lanes asked) would run them one after the other on one worker: 1x.
    """
    # ``loops`` makes ~10 ms; scale it to LONG_SECONDS per item.
    items = [(i, int(loops * LONG_SECONDS / 0.010)) for i in range(workers)]
    t_serial = t_par = t_ex = float("inf")
    pids = workers  # the fewest distinct worker processes one call used
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        list(ex.map(noop, range(workers * 4)))  # start the executor's processes
        for _ in range(LONG_REPEAT):
            t, expect = clocked(lambda: [heavy(it) for it in items])
            t_serial = min(t_serial, t)
            t, got = await aclocked(lambda: engine.parallel_map(heavy_with_pid, items))
            t_par = min(t_par, t)
            assert [value for value, _ in got] == expect
            pids = min(pids, len({pid for _, pid in got}))
            t, got = clocked(lambda: list(ex.map(heavy, items)))
            t_ex = min(t_ex, t)
            assert got == expect
    return [
        [
            f"(d) {workers} items of ~{LONG_SECONDS:g} s (items = workers), serial",
            f"{t_serial:.2f} s",
            "",
            "",
        ],
        [
            f"(d) {workers} items of ~{LONG_SECONDS:g} s (items = workers), parallel_map",
            f"{t_par:.2f} s",
            f"speedup {t_serial / t_par:.2f}x on {workers} workers ({pids} pids)",
            "",
        ],
        [
            f"(d) {workers} items of ~{LONG_SECONDS:g} s, ProcessPoolExecutor.map (reference)",
            f"{t_ex:.2f} s",
            f"speedup {t_serial / t_ex:.2f}x",
            "",
        ],
    ]


def heavy_with_pid(item: tuple[int, int]) -> tuple[int, int]:
    return heavy(item), os.getpid()


async def amain(quick: bool, cases: str) -> None:
    async with engine.Engine(store="memory") as eng:
        run = await eng.run(suite, quick, cases)
        rows = run.result
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    header = ["case", "time", "comparison", "peak RSS (incl. children)"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    print(f"parallel_map benchmark, {cpus} usable CPUs")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="measure ProcessPoolExecutor chunksize=1 on 20,000 items and extrapolate",
    )
    parser.add_argument(
        "--cases",
        default="abcd",
        help="which cases to run, by letter (default: abcd)",
    )
    args = parser.parse_args()
    unknown = set(args.cases) - set("abcd")
    if unknown or not args.cases:
        parser.error(f"--cases takes letters among a, b, c, d; got {args.cases!r}")
    asyncio.run(amain(args.quick, args.cases))


if __name__ == "__main__":
    main()
