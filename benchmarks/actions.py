"""Per-action overhead of shoal against the bare-asyncio floor, in one process.

    python benchmarks/actions.py            # full sizes (as reported in the README)
    python benchmarks/actions.py --quick    # smaller, for a smoke run

Measures:
  * floor: ``asyncio.gather`` of N trivial coroutines;
  * shoal, memory store: a root task gathering N trivial child actions;
  * shoal, SQLite journal: the same, journaled (group commit);
  * resume replay: a journaled run whose N children succeeded and whose root
    then failed, resumed: children come back from the journal;
  * 1,000,000 actions through ``engine.map`` (peak RSS, in a child process);
  * a one-action run awaited in an already running loop, p50 and p99;
  * ``python -c "import engine"`` wall time.

Each figure is the best of several rounds, the floor measured in the same
process between shoal's rounds, so the ratios hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import engine


@engine.task
async def trivial(x: int) -> int:
    return x


@engine.task
async def fan_out(n: int) -> int:
    return len(await asyncio.gather(*(trivial(i) for i in range(n))))


@engine.task
async def fan_out_then_fail(n: int, fail: bool) -> int:
    done = len(await asyncio.gather(*(trivial(i) for i in range(n))))
    if fail:
        raise RuntimeError("fail after the children, to leave something to resume")
    return done


@engine.task
async def one() -> int:
    return 1


async def bare_trivial(x: int) -> int:
    return x


async def floor(n: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(bare_trivial(i) for i in range(n)))
    return time.perf_counter() - start


async def shoal(eng: engine.Engine, n: int) -> float:
    start = time.perf_counter()
    run = await eng.run(fan_out, n)
    elapsed = time.perf_counter() - start
    assert run.result == n, run.error
    return elapsed


async def fan_out_ratio(n: int, rounds: int, store: str) -> tuple[float, float]:
    """(best floor, best shoal) in seconds, interleaved."""
    floors, ours = [], []
    async with engine.Engine(store=store) as eng:
        await shoal(eng, min(n, 1000))  # warm up
        for _ in range(rounds):
            floors.append(await floor(n))
            ours.append(await shoal(eng, n))
    return min(floors), min(ours)


async def replay_rate(n: int, store: str) -> float:
    async with engine.Engine(store=store) as eng:
        run = await eng.run(fan_out_then_fail, n, True)
        assert run.status == "failed"
    # The resumed root fails again at its end; what is measured is the
    # replay of its N succeeded children.
    async with engine.Engine(store=store) as eng:
        start = time.perf_counter()
        resumed = await eng.resume(run.id)
        elapsed = time.perf_counter() - start
    assert resumed.counters["trivial"].replayed == n, resumed.counters
    return n / elapsed


async def one_action_latency(count: int) -> tuple[float, float]:
    samples = []
    async with engine.Engine(store="memory") as eng:
        for _ in range(200):
            await eng.run(one)
        for _ in range(count):
            start = time.perf_counter()
            await eng.run(one)
            samples.append(time.perf_counter() - start)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


MAP_CHILD = """
import asyncio, sys, time
import engine

@engine.task
async def leaf(x: int) -> int:
    return x

@engine.task
async def main(n: int) -> int:
    total = 0
    async for v in engine.map(leaf, range(n), concurrency=1000):
        total += v
    return total

async def go(n):
    async with engine.Engine(store="memory") as eng:
        t = time.perf_counter()
        run = await eng.run(main, n)
        dt = time.perf_counter() - t
    assert run.result == n * (n - 1) // 2, run.error
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the
    # benchmark process this child was forked from.
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    print(dt, hwm / 1024)

asyncio.run(go(int(sys.argv[1])))
"""


def map_million(n: int) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", MAP_CHILD, str(n)], capture_output=True, text=True, check=True)
    seconds, rss_mb = out.stdout.split()
    return float(seconds), float(rss_mb)


def import_time(rounds: int = 7) -> tuple[float, float]:
    # As installed for a user: bytecode cached (pip compiles it on install),
    # so the first, compiling run is a warm-up and not counted.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def best(code: str) -> float:
        times = []
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        for _ in range(rounds):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            times.append(time.perf_counter() - start)
        return min(times)

    return best("import engine"), best("pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    n = 10_000 if args.quick else 100_000
    rounds = 3 if args.quick else 5
    map_n = 50_000 if args.quick else 1_000_000
    latency_count = 1_000 if args.quick else 10_000

    rows: list[tuple[str, str, str]] = []
    f, s = asyncio.run(fan_out_ratio(n, rounds, "memory"))
    rows.append((f"floor: bare asyncio.gather, N={n:,}", f"{f / n * 1e6:.2f} µs/action", "1.00x"))
    rows.append((f"shoal, memory store, N={n:,}", f"{s / n * 1e6:.2f} µs/action", f"{s / f:.2f}x floor (target <= 1.5x)"))

    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "bench.db")
        f, s = asyncio.run(fan_out_ratio(n, rounds, store))
        rows.append((f"shoal, SQLite journal, N={n:,}", f"{s / n * 1e6:.2f} µs/action", f"{s / f:.2f}x floor (target <= 3x)"))
        rate = asyncio.run(replay_rate(n, store))
        rows.append((f"resume replay, N={n:,}", f"{rate:,.0f} actions/s", "target >= 100,000/s"))
        files = sorted(p.name for p in Path(tmp).iterdir())
        rows.append(("journal files on disk", ", ".join(files), "one database (+ its WAL while open)"))

    seconds, rss = map_million(map_n)
    rows.append((f"engine.map, {map_n:,} actions", f"{seconds:.1f} s, peak RSS {rss:.0f} MB", "target <= 300 MB"))

    p50, p99 = asyncio.run(one_action_latency(latency_count))
    rows.append((f"one-action run in a live loop, x{latency_count:,}", f"p50 {p50 * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs", "target p50 <= 100 µs, p99 <= 1 ms"))

    imp, bare = import_time()
    rows.append(("python -c 'import engine'", f"{imp * 1e3:.0f} ms ({(imp - bare) * 1e3:.0f} ms over bare python)", "target <= 100 ms"))

    width = max(len(r[0]) for r in rows)
    width2 = max(len(r[1]) for r in rows)
    print(f"shoal actions benchmark — python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:<{width2}}  {note}")


if __name__ == "__main__":
    main()
