"""Does the progress display slow a run down?

Runs a 100,000-action flow (memory store) with and without the CLI's live
display (rendered into an in-memory rich Console that believes it is a
terminal), alternating, and prints the best time of each and their ratio.

    python benchmarks/progress.py [--actions 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time

from rich.console import Console

import engine
from engine._cli._progress import Progress


@engine.task
async def square(x: int) -> int:
    return x * x


@engine.task
async def main(n: int) -> int:
    total = 0
    squares: engine.MapResults[int] = engine.map(square, range(n))
    async for value in squares:
        total += value
    return total


async def once(n: int, display: bool) -> float:
    async with engine.Engine(store="memory") as eng:
        progress = None
        if display:
            console = Console(file=io.StringIO(), force_terminal=True, width=120)
            progress = Progress(eng, console, live=True)
        start = time.perf_counter()
        run = await eng.submit(main, n)
        follow = asyncio.create_task(progress.follow(run)) if progress else None
        await eng.wait_run(run)
        took = time.perf_counter() - start
        if follow is not None:
            await follow
            progress.close()  # type: ignore[union-attr]
        assert run.status == "succeeded", run.error
        return took


def bench(n: int, repeat: int) -> None:
    asyncio.run(once(min(n, 10_000), False))  # warm up imports and caches
    plain: list[float] = []
    shown: list[float] = []
    for _ in range(repeat):
        plain.append(asyncio.run(once(n, False)))
        shown.append(asyncio.run(once(n, True)))
    best_plain, best_shown = min(plain), min(shown)
    print(f"{n:,} actions, best of {repeat}")
    print(f"  without display: {best_plain:.3f} s  ({n / best_plain:,.0f} actions/s)")
    print(f"  with display:    {best_shown:.3f} s  ({n / best_shown:,.0f} actions/s)")
    print(f"  ratio (with / without): {best_shown / best_plain:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    ns = parser.parse_args()
    bench(ns.actions, ns.repeat)
