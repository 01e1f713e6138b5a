"""Branch, fan out, join.

Two branches run at once: one squares every number below ``n`` (one action
per number, through ``engine.map``, which keeps at most 1,000 actions in
flight however large ``n`` is), the other computes the expected total in
closed form.  The join checks that they agree.

    shoal run examples/fanout.py --n 100000
"""

import asyncio

import engine


@engine.task
async def square(x: int) -> int:
    return x * x


@engine.task
async def expected_total(n: int) -> int:
    """Sum of the squares of 0 .. n-1, in closed form."""
    return (n - 1) * n * (2 * n - 1) // 6


@engine.task
async def check(total: int, expected: int) -> bool:
    if total != expected:
        raise ValueError(f"the squares add up to {total}, expected {expected}")
    return True


async def sum_of_squares(n: int) -> int:
    total = 0
    squares: engine.MapResults[int] = engine.map(square, range(n))
    async for value in squares:
        total += value
    return total


@engine.task
async def main(n: int = 1000) -> int:
    """Square the numbers below n in parallel actions and add them up."""
    total, expected = await asyncio.gather(sum_of_squares(n), expected_total(n))
    await check(total, expected)
    return total
