"""A small data pipeline: load, split into shards, process each, aggregate.

The loading and the per-shard work are cached (``cache=True``): run it twice
and the second run serves them from the cache.  ``engine.group`` labels the
stages, which ``shoal show RUN`` draws as a tree.

    shoal run examples/pipeline.py --rows 100000 --shards 16
"""

import math
import random

import msgspec

import engine


class Stats(msgspec.Struct, frozen=True):
    """Partial statistics of one shard (they add up across shards)."""

    count: int
    total: float
    squares: float
    low: float
    high: float


class Summary(msgspec.Struct, frozen=True):
    rows: int
    mean: float
    std: float
    low: float
    high: float


@engine.task(cache=True)
async def load(rows: int, seed: int) -> list[float]:
    """Stand-in for reading a dataset: reproducible pseudo-random measurements."""
    rng = random.Random(seed)
    return [round(rng.gauss(10.0, 2.0), 4) for _ in range(rows)]


@engine.task(cache=True)
async def process(shard: list[float]) -> Stats:
    return Stats(
        count=len(shard),
        total=sum(shard),
        squares=sum(x * x for x in shard),
        low=min(shard, default=math.inf),
        high=max(shard, default=-math.inf),
    )


@engine.task
async def aggregate(parts: list[Stats]) -> Summary:
    count = sum(p.count for p in parts)
    mean = sum(p.total for p in parts) / count
    variance = max(sum(p.squares for p in parts) / count - mean * mean, 0.0)
    return Summary(
        rows=count,
        mean=round(mean, 4),
        std=round(math.sqrt(variance), 4),
        low=min(p.low for p in parts),
        high=max(p.high for p in parts),
    )


@engine.task
async def main(rows: int = 10_000, shards: int = 8, seed: int = 0) -> Summary:
    """Summarise a dataset shard by shard."""
    if rows < 1 or shards < 1:
        raise ValueError("rows and shards must be at least 1")
    async with engine.group("load"):
        data = await load(rows, seed)
    async with engine.group("shards"):
        parts: list[Stats] = await engine.map(process, [data[i::shards] for i in range(shards)])
    async with engine.group("report"):
        return await aggregate(parts)
