"""A flow whose leaf fails its first two attempts per item (counted in files in the working folder)."""

import asyncio
import pathlib

import engine


def _count(i: int) -> int:
    mark = pathlib.Path(f"tries-{i}")
    n = int(mark.read_text()) + 1 if mark.exists() else 1
    mark.write_text(str(n))
    return n


@engine.task
async def flaky(i: int) -> int:
    n = _count(i)
    if n < 3:
        raise ValueError(f"attempt {n} of item {i}")
    return i


@engine.task
async def main(n: int = 2) -> int:
    return sum(await asyncio.gather(*(flaky(i) for i in range(n))))
