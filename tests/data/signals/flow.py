"""A flow that waits: run as ``python flow.py`` (``engine.run``) or ``shoal run flow.py``."""

from __future__ import annotations

import asyncio

import engine


@engine.task
async def nap(i: int) -> int:
    await asyncio.sleep(60)
    return i


@engine.task
async def main() -> int:
    return sum(await asyncio.gather(*(nap(i) for i in range(3))))


if __name__ == "__main__":
    engine.run(main)
