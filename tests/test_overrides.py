"""task.override(...) handles and Engine(overrides=...): other options, same task."""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

import pytest

import engine

if TYPE_CHECKING:
    from pathlib import Path

    from _fakes import FakeSleep

CALLS: dict[str, int] = {}
RUNNING = {"now": 0, "most": 0}


@engine.task
async def shaky(i: int) -> int:
    """Fails its first two attempts for each item."""
    CALLS[f"shaky-{i}"] = CALLS.get(f"shaky-{i}", 0) + 1
    if CALLS[f"shaky-{i}"] < 3:
        raise ValueError(f"attempt {CALLS[f'shaky-{i}']} of {i}")
    return i * 10


@engine.task
async def through_handle(n: int) -> list[int]:
    return list(await asyncio.gather(*(shaky.override(retries=2)(i) for i in range(n))))


@engine.task
async def plain_calls(n: int) -> list[int]:
    return list(await asyncio.gather(*(shaky(i) for i in range(n))))


@engine.task(cache="v1")
async def cached_square(x: int) -> int:
    CALLS["square"] = CALLS.get("square", 0) + 1
    return x * x


@engine.task
async def square_with_retries(x: int) -> int:
    return await cached_square.override(retries=3, timeout=10)(x)


@engine.task
async def square_plainly(x: int) -> int:
    return await cached_square(x)


@engine.task
async def sleepy(x: float) -> float:
    await asyncio.sleep(x)
    return x


@engine.task
async def times_out() -> float:
    return await sleepy.override(timeout=0.05)(30.0)


@engine.task(concurrency=1)
async def narrow(i: int) -> int:
    RUNNING["now"] += 1
    RUNNING["most"] = max(RUNNING["most"], RUNNING["now"])
    await asyncio.sleep(0.01)
    RUNNING["now"] -= 1
    return i


@engine.task
async def mixed_narrow(n: int) -> int:
    handle = narrow.override(retries=1)
    calls = [narrow(i) if i % 2 else handle(i) for i in range(n)]
    return sum(await asyncio.gather(*calls))


@engine.task
async def wider(n: int) -> int:
    return sum(await asyncio.gather(*(narrow.override(concurrency=3)(i) for i in range(n))))


@engine.task(offload="nowhere")
async def placed(x: int) -> int:
    return x + 1


@engine.task
async def placed_here(x: int) -> int:
    return await placed.override(offload="local")(x)


@engine.task
async def placed_twice(x: int) -> int:
    here = await placed.override(offload="local")(x)
    try:
        await placed(x)
    except engine.ConfigError as exc:
        return here if "'nowhere'" in str(exc) else -1
    return -2


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    RUNNING.update(now=0, most=0)


def _engine(fake_sleep: FakeSleep, store: str | Path = "memory", **kwargs: object) -> engine.Engine:
    return engine.Engine(store=store, sleep=fake_sleep, rng=random.Random(1), **kwargs)  # type: ignore[arg-type]


async def test_a_handle_retries_where_the_task_does_not(fake_sleep: FakeSleep) -> None:
    async with _engine(fake_sleep) as eng:
        assert (await eng.run(through_handle, 3)).result == [0, 10, 20]
        CALLS.clear()
        run = await eng.run(plain_calls, 3)
    assert run.status == "failed"
    assert all(n == 1 for n in CALLS.values())  # no retries in the task's own options
    assert shaky.retry.attempts == 0  # the task itself is unchanged


async def test_a_handle_has_the_same_name_and_keys_so_the_cache_sees_one_task(tmp_path: Path, fake_sleep: FakeSleep) -> None:
    async with _engine(fake_sleep, tmp_path / "j.db") as eng:
        first = await eng.run(square_with_retries, 7)
        second = await eng.run(square_plainly, 7)
        (via_handle,) = [a async for a in (await eng.get_run(first.id)).aactions(task="cached_square")]
        (plain,) = [a async for a in (await eng.get_run(second.id)).aactions(task="cached_square")]
    assert first.result == second.result == 49
    assert CALLS["square"] == 1 and plain.cached  # the plain call found the handle's result
    assert via_handle.cache_key == plain.cache_key and via_handle.task == plain.task == "cached_square"


async def test_a_resumed_run_replays_what_a_handle_recorded(tmp_path: Path, fake_sleep: FakeSleep) -> None:
    CALLS["shaky-1"] = -5  # item 1 fails past its 2 retries the first time
    async with _engine(fake_sleep, tmp_path / "j.db") as eng:
        run = await eng.run(through_handle, 3)
        assert run.status == "failed"
        before = dict(CALLS)
        CALLS["shaky-1"] = 2
        again = await eng.resume(run.id)
    assert again.status == "succeeded" and again.result == [0, 10, 20]
    assert CALLS["shaky-0"] == before["shaky-0"] and CALLS["shaky-2"] == before["shaky-2"]  # replayed


async def test_a_handle_timeout_is_enforced(fake_sleep: FakeSleep) -> None:
    async with _engine(fake_sleep) as eng:
        run = await eng.run(times_out)
    assert run.status == "failed" and isinstance(run.error, engine.ActionTimeout)


async def test_handles_share_the_tasks_concurrency_unless_given_their_own(fake_sleep: FakeSleep) -> None:
    async with _engine(fake_sleep) as eng:
        assert (await eng.run(mixed_narrow, 6)).result == 15
        assert RUNNING["most"] == 1
        RUNNING.update(now=0, most=0)
        assert (await eng.run(wider, 9)).result == 36
    assert 1 < RUNNING["most"] <= 3


async def test_offload_is_placed_per_handle(fake_sleep: FakeSleep) -> None:
    async with _engine(fake_sleep) as eng:
        assert (await eng.run(placed_here, 1)).result == 2
        # The same task called directly is still sent to its (undefined) target.
        assert (await eng.run(placed_twice, 1)).result == 2


def test_override_refuses_unknown_options_and_the_name() -> None:
    with pytest.raises(engine.ConfigError, match=r"unknown option 'retires'\. Did you mean 'retries'"):
        shaky.override(retires=3)
    with pytest.raises(engine.ConfigError, match="cannot change the name"):
        shaky.override(name="other")
    with pytest.raises(engine.ConfigError, match="timeout= is a number of seconds > 0"):
        shaky.override(timeout=-1)
    assert shaky.override(retries=2) is shaky.override(retries=2)  # one handle per options
    assert shaky.override(retries=2) is not shaky.override(retries=3)


async def test_engine_overrides_apply_by_name_and_win_over_code(fake_sleep: FakeSleep) -> None:
    async with _engine(fake_sleep, overrides={"shaky": {"retries": 2}}) as eng:
        assert (await eng.run(plain_calls, 2)).result == [0, 10]
    CALLS.clear()
    async with _engine(fake_sleep, overrides={"shaky": {"retries": 0}}) as eng:
        run = await eng.run(through_handle, 2)  # the handle's retries=2 is overridden
    assert run.status == "failed" and max(CALLS.values()) == 1
    async with _engine(fake_sleep, overrides={"sleepy": {"timeout": 0.05}}) as eng:
        root = await eng.run(sleepy, 30.0)  # the root task too
    assert isinstance(root.error, engine.ActionTimeout)


def test_engine_overrides_are_checked_when_the_engine_is_made() -> None:
    with pytest.raises(engine.ConfigError, match="unknown option 'retry'"):
        engine.Engine(store="memory", overrides={"shaky": {"retry": 2}})
    with pytest.raises(engine.ConfigError, match="concurrency= is the most actions"):
        engine.Engine(store="memory", overrides={"shaky": {"concurrency": 0}})
