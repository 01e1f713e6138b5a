"""A flow whose tasks say which process ran them, for ``--offload``."""

import asyncio
import os

import engine


@engine.task
async def where(i: int) -> int:
    return os.getpid() + 0 * i


@engine.task(offload="box")
async def boxed() -> int:
    return os.getpid()


@engine.task(name="which")
async def named_otherwise() -> int:
    return os.getpid()


@engine.task
async def main(n: int = 2, boxes: bool = False) -> dict[str, list[int]]:
    pids = await asyncio.gather(*(where(i) for i in range(n)))
    placed = {"main": [os.getpid()], "where": list(pids), "which": [await named_otherwise()]}
    if boxes:
        placed["boxed"] = [await boxed()]
    return placed


@engine.task
async def elsewhere(driver: int) -> int:
    if os.getpid() == driver:
        raise RuntimeError("this task must not run in the process that drives the run")
    return os.getpid()


@engine.task
async def away() -> int:
    return await elsewhere(os.getpid())
