"""A user's script: its functions and classes live in __main__.

It deliberately has no ``if __name__ == "__main__":`` guard: worker
processes must not import it again.
"""

import asyncio
import os
import sys

import engine

with open(sys.argv[1], "a") as marker:
    marker.write(f"{os.getpid()}\n")  # one line per import of this script


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def offset() -> int:
    return 1000


def make_point(x: int) -> Point:
    return Point(x + offset())


@engine.task
async def main() -> list[int]:
    points = await engine.parallel_map(make_point, range(20))
    assert all(type(p) is Point for p in points), [type(p) for p in points]
    return [p.x for p in points]


async def run() -> None:
    async with engine.Engine(store="memory") as eng:
        result = await eng.run(main)
        sys.stdout.write(f"{sum(result.result)}\n")


asyncio.run(run())
