"""The journaled path at scale: peak memory, reading a large run, failures.

    python benchmarks/journal.py                  # full sizes
    python benchmarks/journal.py --quick          # smaller, for a smoke run
    python benchmarks/journal.py --cases map,show # some cases only
    python benchmarks/journal.py --cases failures --rounds 20  # best of 20 rounds

Every case runs in a child process of its own (``python -c`` or the shoal
command line as ``python -m engine._cli``), so that its peak RSS is its own:
it is read from ``os.wait4``'s resource usage of that one child.  The kernel
counts in it the high-water mark of the process the child was spawned from,
so this process never imports shoal and stays small (its own peak is
printed as the floor of the measure).  Which ``engine`` is measured is
whichever ``import engine`` finds in the child: set ``PYTHONPATH`` to
another checkout's ``src`` to measure that one.

Cases (``--cases``, comma-separated; default all):

  * ``map``: N journaled actions through ``engine.map`` (concurrency 1,000),
    and the same with the memory store: time and peak RSS (target: 1,000,000
    journaled actions at <= 300 MB);
  * ``fanout``: ``shoal run examples/fanout.py --n N``, journaled and with
    ``--store memory``: time and peak RSS (target: 2,000,000 at <= 300 MB);
  * ``show``: on the journaled ``map`` run (N + 1 actions), the wall time of
    ``engine.get_run(RUN)`` in a fresh process (opening the journal and the
    query, not the import) and of the whole ``shoal show RUN`` command, best
    of three (target: < 1 s);
  * ``failures``: a root gathering 2,000 children that each raise
    ``ValueError`` (``gather(..., return_exceptions=True)``), journaled
    against the memory store, rounds alternating in one process (target:
    <= 2x), with the longest stall of the event loop seen by a 1 ms ticker;
  * ``chain``: a chain of 486 nested actions whose innermost one raises,
    journaled: time and the size of the journal it leaves.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

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

async def go(store, n):
    async with engine.Engine(store=store) as eng:
        t = time.perf_counter()
        run = await eng.run(main, n)
        dt = time.perf_counter() - t
    assert run.result == n * (n - 1) // 2, run.error
    print(dt, run.id)

asyncio.run(go(sys.argv[1], int(sys.argv[2])))
"""

GET_RUN_CHILD = """
import sys, time
import engine

t = time.perf_counter()
summary = engine.get_run(sys.argv[1], load_code=False)  # read the journal; import nothing
dt = time.perf_counter() - t
assert summary is not None
print(dt)
"""

FAILURES_CHILD = """
import asyncio, sys, time
import engine

@engine.task
async def fails(i: int) -> int:
    raise ValueError(f"child {i} fails")

@engine.task
async def root(n: int) -> int:
    results = await asyncio.gather(*(fails(i) for i in range(n)), return_exceptions=True)
    return sum(isinstance(r, ValueError) for r in results)

async def timed(eng, n):
    # The ticker wakes every millisecond; its longest gap is the longest
    # stretch the loop spent on something else in one go.
    stall = 0.0
    done = False

    async def ticker():
        nonlocal stall
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall = max(stall, now - last)
            last = now

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    t = time.perf_counter()
    run = await eng.run(root, n)
    dt = time.perf_counter() - t
    done = True
    await tick
    assert run.result == n, (run.status, run.error)
    return dt, stall

async def go(store, n, rounds):
    best = {"memory": (1e9, 0.0), "journal": (1e9, 0.0)}
    async with engine.Engine(store="memory") as mem, engine.Engine(store=store) as jour:
        await timed(mem, 100)  # warm up: journal open, code paths hot
        await timed(jour, 100)
        for _ in range(rounds):
            for name, eng in (("memory", mem), ("journal", jour)):
                best[name] = min(best[name], await timed(eng, n))
    print(*best["memory"], *best["journal"])

asyncio.run(go(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""

CHAIN_CHILD = """
import asyncio, sys, time
import engine

@engine.task
async def link(depth: int) -> int:
    if depth == 0:
        raise ValueError("the innermost link fails")
    return await link(depth - 1) + 1

async def go(store, depth):
    async with engine.Engine(store=store) as eng:
        t = time.perf_counter()
        run = await eng.run(link, depth)
        dt = time.perf_counter() - t
    assert run.status == "failed", run.status
    assert "innermost link fails" in repr(run.error), run.error
    print(dt)

asyncio.run(go(sys.argv[1], int(sys.argv[2])))
"""


@dataclass(frozen=True)
class Child:
    seconds: float
    rss_mb: float
    stdout: str


def child(args: list[str], env: dict[str, str], *, timeout: float = 900) -> Child:
    """Run one child to its end: its wall time, its own peak RSS and its stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        try:
            # wait4, not Popen.wait: the resource usage of this child alone
            # (RUSAGE_CHILDREN would keep the largest of all children so far).
            deadline = start + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.02)
        finally:
            proc.returncode = 0  # reaped here; keep Popen from waiting again
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(args[:4])} ... exited {code}:\n{stderr[-3000:]}")
    return Child(seconds, usage.ru_maxrss / 1024, stdout)


def python(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def shoal(*args: object) -> list[str]:
    return [sys.executable, "-m", "engine._cli", *map(str, args)]


def file_size_mb(db: Path) -> float:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--cases", default="map,fanout,show,failures,chain", help="comma-separated cases (default all)")
    parser.add_argument(
        "--rounds", type=int, default=None,
        help="rounds of the failures case, the best kept (default 5, 3 with --quick; more on a noisy machine)",
    )
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    unknown = cases - {"map", "fanout", "show", "failures", "chain"}
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    map_n = 100_000 if args.quick else 1_000_000
    fanout_n = 200_000 if args.quick else 2_000_000
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    failing, rounds = 2_000, args.rounds or (3 if args.quick else 5)
    depth = 100 if args.quick else 486

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        # Commands given no store use the journal under this home, as a user's would.
        env = {**os.environ, "SHOAL_HOME": str(home)}
        db = home / "shoal.db"

        if "map" in cases or "show" in cases:
            run = child(python(MAP_CHILD, db, map_n), env)
            seconds, run_id = run.stdout.split()
            rows.append((f"engine.map, {map_n:,} actions, journal", f"{float(seconds):.1f} s, peak RSS {run.rss_mb:.0f} MB", "target <= 300 MB"))
            if "map" in cases:
                mem = child(python(MAP_CHILD, "memory", map_n), env)
                rows.append((f"engine.map, {map_n:,} actions, memory store", f"{float(mem.stdout.split()[0]):.1f} s, peak RSS {mem.rss_mb:.0f} MB", "reference"))
                rows.append(("  journal file after the map run", f"{file_size_mb(db):.0f} MB", ""))

            if "show" in cases:
                get_runs = [float(child(python(GET_RUN_CHILD, run_id), env).stdout.split()[0]) for _ in range(3)]
                shows = [child(shoal("show", run_id), env) for _ in range(3)]
                rows.append((f"engine.get_run(RUN), {map_n + 1:,}-action run", f"{min(get_runs):.2f} s (first {get_runs[0]:.2f} s)", "target < 1 s"))
                rows.append((f"shoal show RUN, {map_n + 1:,}-action run", f"{min(s.seconds for s in shows):.2f} s wall, whole command (first {shows[0].seconds:.2f} s)", "target < 1 s"))

        if "fanout" in cases:
            for label, store in [("journal", str(home / "fanout.db")), ("memory store", "memory")]:
                run = child(shoal("run", EXAMPLES / "fanout.py", "--n", fanout_n, "--store", store), env)
                target = "target <= 300 MB" if store != "memory" else "reference"
                rows.append((f"shoal run examples/fanout.py --n {fanout_n:,}, {label}", f"{run.seconds:.1f} s, peak RSS {run.rss_mb:.0f} MB", target))

        if "failures" in cases:
            out = child(python(FAILURES_CHILD, home / "failures.db", failing, rounds), env).stdout.split()
            mem_s, mem_stall, jour_s, jour_stall = map(float, out)
            rows.append((f"{failing:,} failing children, memory store", f"{mem_s * 1e3:.0f} ms, longest loop stall {mem_stall * 1e3:.0f} ms", "1.00x"))
            rows.append((f"{failing:,} failing children, journal", f"{jour_s * 1e3:.0f} ms, longest loop stall {jour_stall * 1e3:.0f} ms", f"{jour_s / mem_s:.2f}x memory store (target <= 2x)"))

        if "chain" in cases:
            chain_db = home / "chain.db"
            run = child(python(CHAIN_CHILD, chain_db, depth), env)
            rows.append((f"{depth}-deep failing chain, journal", f"{float(run.stdout):.2f} s, journal {file_size_mb(chain_db):.1f} MB", ""))
            mem = child(python(CHAIN_CHILD, "memory", depth), env)
            rows.append((f"{depth}-deep failing chain, memory store", f"{float(mem.stdout):.2f} s", "reference"))

    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    width = max(len(r[0]) for r in rows)
    width2 = max(len(r[1]) for r in rows)
    print(f"shoal journal benchmark — python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')} (RSS floor: this process, {floor:.0f} MB)")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:<{width2}}  {note}")


if __name__ == "__main__":
    main()
