"""Offloaded actions on ``offload.Local`` workers, against a plain process pool.

    python benchmarks/offload.py            # N = 2,000
    python benchmarks/offload.py --quick    # N = 300

In one process, taking turns over several rounds:

  * baseline: ``concurrent.futures.ProcessPoolExecutor(2)`` with one
    ``submit`` per item (a task returning its input), all awaited together;
  * shoal, memory store: the same N items as N offloaded actions of a task
    returning its input, through ``offload.Local(workers=2)``, on an engine
    kept open across rounds (warm workers, as a service would have);
  * shoal, journal: the same on a journaled engine (a temporary home).

Reported: items per second of each, the throughput ratio shoal/baseline
(target >= 1.0x), the journal's cost over the memory store (target <=
1.3x), and the time from creating an ``Engine`` to the first offloaded
result, cold (spawning the worker, its hello, the code bundle; target <=
300 ms), as the median of several fresh engines.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# This script's folder is first on sys.path, and this script is named
# offload.py: moved to the end, so that `import offload` finds the package.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _HERE] + [_HERE]

import _offload_tasks as tasks  # noqa: E402
import engine  # noqa: E402
import offload  # noqa: E402


@engine.task
async def fan(n: int) -> int:
    return len(await asyncio.gather(*(tasks.echo(i) for i in range(n))))


@engine.task
async def one() -> int:
    return await tasks.echo(1)


async def pool_round(pool: ProcessPoolExecutor, n: int) -> float:
    start = time.perf_counter()
    results = await asyncio.gather(*(asyncio.wrap_future(pool.submit(tasks.echo_plain, i)) for i in range(n)))
    elapsed = time.perf_counter() - start
    assert results == list(range(n))
    return elapsed


async def shoal_round(eng: engine.Engine, n: int) -> float:
    start = time.perf_counter()
    run = await eng.run(fan, n)
    elapsed = time.perf_counter() - start
    assert run.result == n, run.error
    return elapsed


async def cold_first_result(home: Path | None) -> float:
    start = time.perf_counter()
    store = "memory" if home is None else None
    async with engine.Engine(store=store, home=home, targets={"box": offload.Local(workers=2)}) as eng:
        run = await eng.run(one)
        elapsed = time.perf_counter() - start
        assert run.result == 1, run.error
    return elapsed


async def main(n: int, rounds: int, colds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        base: list[float] = []
        mem: list[float] = []
        jour: list[float] = []
        with ProcessPoolExecutor(2) as pool:
            await pool_round(pool, 50)  # warm: start both processes
            async with engine.Engine(store="memory", targets={"box": offload.Local(workers=2)}) as m, \
                    engine.Engine(home=home / "journal", targets={"box": offload.Local(workers=2)}) as j:
                await shoal_round(m, 50)
                await shoal_round(j, 50)
                for _ in range(rounds):
                    base.append(await pool_round(pool, n))
                    mem.append(await shoal_round(m, n))
                    jour.append(await shoal_round(j, n))
        cold = [await cold_first_result(None) for _ in range(colds)]
    b, mm, jj = (statistics.median(x) for x in (base, mem, jour))
    print(f"offload.Local(workers=2) vs ProcessPoolExecutor(2), N = {n:,} tiny items, {rounds} rounds (medians)")
    print(f"  ProcessPoolExecutor, one submit per item: {n / b:10,.0f} items/s")
    print(f"  shoal offloaded, memory store:            {n / mm:10,.0f} actions/s   {b / mm:5.2f}x the pool  (target >= 1.0x)")
    print(f"  shoal offloaded, journal:                 {n / jj:10,.0f} actions/s   {b / jj:5.2f}x the pool")
    print(f"  journal / memory store, time per action:  {jj / mm:5.2f}x   (target <= 1.3x)")
    print(
        f"  Engine start to first offloaded result (cold): {statistics.median(cold) * 1000:6.0f} ms median "
        f"of {colds} (range {min(cold) * 1000:.0f}-{max(cold) * 1000:.0f} ms; target <= 300 ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        asyncio.run(main(300, 3, 3))
    else:
        asyncio.run(main(2000, 5, 5))
