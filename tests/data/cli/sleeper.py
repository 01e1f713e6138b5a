"""A run whose sync task sleeps far longer than anyone waits for it."""

import asyncio
import time

import engine


@engine.task
async def nap(i: int) -> int:
    await asyncio.sleep(0)
    return i


@engine.task
def sleep_long(seconds: float) -> float:
    """A sync task: runs in a worker thread, which nothing can stop."""
    time.sleep(seconds)
    return seconds


@engine.task
async def main(n: int = 20, seconds: float = 600.0) -> float:
    await asyncio.gather(*(nap(i) for i in range(n)))
    return await sleep_long(seconds)  # type: ignore[misc, no-any-return]
