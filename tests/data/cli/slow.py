import asyncio

import engine


@engine.task
async def nap(i: int) -> int:
    await asyncio.sleep(0.01)
    return i


@engine.task
async def main(n: int = 100_000) -> int:
    return sum(await engine.map(nap, range(n), concurrency=50))
