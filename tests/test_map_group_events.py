"""engine.map, engine.group, events and counters."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

import engine


@engine.task
async def double(x: int) -> int:
    return 2 * x


async def test_map_results_in_order(eng: engine.Engine) -> None:
    @engine.task
    async def slow_first(x: int) -> int:
        await asyncio.sleep(0.01 if x == 0 else 0)
        return x

    @engine.task
    async def main(n: int) -> list[int]:
        return await engine.map(slow_first, range(n), concurrency=4)

    run = await eng.run(main, 20)
    assert run.result == list(range(20))
    assert run.counters["slow_first"].succeeded == 20


async def test_map_zips_several_iterables_and_streams(eng: engine.Engine) -> None:
    @engine.task
    async def add(a: int, b: int) -> int:
        return a + b

    @engine.task
    async def main() -> list[int]:
        out = []
        async for value in engine.map(add, [1, 2, 3], [10, 20, 30]):
            out.append(value)
        return out

    assert (await eng.run(main)).result == [11, 22, 33]


async def test_map_keeps_only_a_window_in_flight(eng: engine.Engine) -> None:
    """A huge input is consumed lazily: actions never exceed the window."""
    peak = 0
    now = 0
    pulled = 0

    @engine.task
    async def leaf(x: int) -> int:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0)
        now -= 1
        return x

    def items(n: int):  # type: ignore[no-untyped-def]
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield i

    @engine.task
    async def main() -> int:
        total = 0
        async for v in engine.map(leaf, items(20_000), concurrency=50):
            total += v
            assert pulled - (v + 1) <= 50
        return total

    run = await eng.run(main)
    assert run.result == sum(range(20_000))
    assert peak <= 50
    gc.collect()


async def test_map_first_failure_cancels_the_rest(eng: engine.Engine) -> None:
    cancelled = 0

    @engine.task
    async def item(x: int) -> int:
        nonlocal cancelled
        if x == 3:
            raise ValueError("item 3 is bad")
        try:
            await asyncio.sleep(0 if x < 3 else 30)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return x

    @engine.task
    async def main() -> list[int]:
        return await engine.map(item, range(10), concurrency=10)

    run = await eng.run(main)
    assert run.status == "failed"
    assert str(run.error) == "item 3 is bad"
    assert cancelled == 6
    assert run.counters["item"].cancelled == 6


async def test_map_return_exceptions(eng: engine.Engine) -> None:
    @engine.task
    async def maybe(x: int) -> int:
        if x % 2:
            raise ValueError(str(x))
        return x

    @engine.task
    async def main() -> list[str]:
        results = await engine.map(maybe, range(4), return_exceptions=True)
        return [repr(r) for r in results]

    assert (await eng.run(main)).result == ["0", "ValueError('1')", "2", "ValueError('3')"]


async def test_map_outside_a_run_calls_the_functions() -> None:
    assert await engine.map(double, range(5)) == [0, 2, 4, 6, 8]


def test_map_validates_its_options() -> None:
    with pytest.raises(engine.ConfigError, match="concurrency"):
        engine.map(double, [1], concurrency=0)
    with pytest.raises(engine.ConfigError, match="iterable"):
        engine.map(double)


async def test_groups_label_actions_and_nest(eng: engine.Engine) -> None:
    events = eng.events()

    @engine.task
    async def main() -> None:
        async with engine.group("load"):
            await double(1)
            async with engine.group("shards"):
                await engine.map(double, range(3))
        await double(2)

    run = await eng.run(main)
    events.close()
    groups: dict[str | None, int] = {}
    async for ev in events:
        if ev.kind == "succeeded" and ev.task == "double":
            groups.setdefault(ev.group, 0)
            groups[ev.group] += 1
    assert groups == {"load": 1, "load/shards": 3, None: 1}
    assert run.groups == {"load", "load/shards"}


async def test_events_stream_action_state_changes(eng: engine.Engine) -> None:
    attempts = 0

    @engine.task(retries=1)
    async def flaky() -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("first try fails")
        return 1

    @engine.task
    async def bad() -> None:
        raise ValueError("nope")

    @engine.task
    async def main() -> None:
        await flaky()
        with contextlib.suppress(ValueError):
            await bad()

    async with eng.events() as stream:
        run = await eng.run(main)
        stream.close()
        seen = [(e.task, e.kind) for e in [ev async for ev in stream]]
    assert seen == [
        ("main", "started"),
        ("flaky", "started"),
        ("flaky", "retrying"),
        ("flaky", "succeeded"),
        ("bad", "started"),
        ("bad", "failed"),
        ("main", "succeeded"),
    ]
    assert run.stats["failed"] == 1 and run.stats["retries"] == 1


async def test_counters_are_counts_not_kept_actions(eng: engine.Engine) -> None:
    @engine.task
    async def main(n: int) -> int:
        return sum(await asyncio.gather(*(double(i) for i in range(n))))

    run = await eng.run(main, 1000)
    counts = run.counters["double"]
    assert (counts.pending, counts.running, counts.succeeded, counts.total) == (0, 0, 1000, 1000)
    assert run.stats["succeeded"] == 1001
    assert not eng.subscribers
