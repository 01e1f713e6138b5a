"""A run of 15 actions (a root and 14 children) that also maps a function over 5 items."""

from __future__ import annotations

import asyncio

import engine


def cube(x: int) -> int:
    if x < 0:
        raise ValueError(f"no negative items (got {x})")
    return x**3


@engine.task
async def square(x: int) -> int:
    return x * x


@engine.task
async def main(children: int = 14, items: int = 5, bad: bool = False) -> int:
    squares = await asyncio.gather(*(square(i) for i in range(children)))
    values = [-1 if bad and i == 1 else i for i in range(items)]
    cubes = await engine.parallel_map(cube, values, chunksize=1)
    return sum(squares) + sum(cubes)
