"""Retries, backoff, timeouts and how errors reach the caller."""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

import pytest

import engine

if TYPE_CHECKING:
    from _fakes import FakeSleep


async def test_retries_with_their_count(eng: engine.Engine, fake_sleep: FakeSleep) -> None:
    calls = 0

    @engine.task(retries=3)
    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError(f"try {calls}")
        return "ok"

    run = await eng.run(flaky)
    assert run.result == "ok"
    assert calls == 3
    assert run.counters["flaky"].retries == 2
    assert len(fake_sleep.delays) == 2


async def test_retries_run_out_and_the_last_error_surfaces(eng: engine.Engine) -> None:
    calls = 0

    @engine.task(retries=2)
    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise ValueError(f"bad {calls}")

    run = await eng.run(broken)
    assert run.status == "failed"
    assert calls == 3
    assert str(run.error) == "bad 3"
    assert run.counters["broken"].failed == 1


async def test_backoff_is_exponential_capped_and_jittered(fake_sleep: FakeSleep) -> None:
    @engine.task(retries=engine.Retry(5, backoff=1.0, max_delay=5.0, jitter=0.0))
    async def always() -> None:
        raise OSError("down")

    async with engine.Engine(store="memory", sleep=fake_sleep) as eng:
        await eng.run(always)
    assert fake_sleep.delays == [1.0, 2.0, 4.0, 5.0, 5.0]

    jittered = engine.Retry(3, backoff=1.0, jitter=0.5)
    rng = random.Random(1)
    delays = [jittered.delay(1, rng) for _ in range(200)]
    assert min(delays) >= 0.5 and max(delays) <= 1.5
    assert len({round(d, 6) for d in delays}) > 100


async def test_retry_only_on_listed_exceptions(eng: engine.Engine) -> None:
    calls = 0

    @engine.task(retries=engine.Retry(5, on=(ConnectionError,)))
    async def picky() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("not retried")

    run = await eng.run(picky)
    assert calls == 1
    assert isinstance(run.error, KeyError)


async def test_timeout_cuts_a_sleeping_task_short(eng: engine.Engine) -> None:
    finished = False

    @engine.task(timeout=0.05)
    async def sleepy() -> None:
        nonlocal finished
        await asyncio.sleep(30)
        finished = True

    loop = asyncio.get_running_loop()
    started = loop.time()
    run = await eng.run(sleepy)
    elapsed = loop.time() - started
    assert run.status == "failed"
    assert isinstance(run.error, engine.ActionTimeout)
    assert isinstance(run.error, TimeoutError)
    assert "sleepy" in str(run.error) and "0.05 s" in str(run.error)
    assert not finished
    assert elapsed < 15  # far less than the 30 s the task wanted


async def test_timeouts_are_retried(eng: engine.Engine) -> None:
    calls = 0

    @engine.task(timeout=0.05, retries=2)
    async def slow_then_fast() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            await asyncio.sleep(30)
        return calls

    run = await eng.run(slow_then_fast)
    assert run.result == 3


async def test_child_exception_surfaces_in_parent_await_as_itself(eng: engine.Engine) -> None:
    class Custom(Exception):
        pass

    @engine.task
    async def child() -> None:
        raise Custom("from child")

    @engine.task
    async def parent() -> str:
        try:
            await child()
        except Custom as exc:
            return f"caught {exc}"
        return "nothing"

    run = await eng.run(parent)
    assert run.result == "caught from child"
    assert run.counters["child"].failed == 1


async def test_run_failed_is_chained_to_the_cause(eng: engine.Engine) -> None:
    @engine.task
    async def boom() -> None:
        raise RuntimeError("kaboom")

    @engine.task
    async def main() -> None:
        await boom()

    run = await eng.run(main)
    assert run.status == "failed"
    with pytest.raises(engine.RunFailed, match="kaboom") as info:
        _ = run.result
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.run_id == run.id


async def test_unpicklable_exception_is_reported_and_engine_survives(tmp_path: object) -> None:
    import threading

    class Unpicklable(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()

    @engine.task
    async def bad() -> None:
        raise Unpicklable("holds a lock")

    @engine.task
    async def good() -> int:
        return 1

    async with engine.Engine(store="journal.db") as eng:
        run = await eng.run(bad)
        assert run.status == "failed"
        assert isinstance(run.error, Unpicklable)
        details = await eng.get_run(run.id, actions=True)
        [record] = details.action_records
        assert record.state == "failed"
        assert record.error is not None
        assert record.error.message == "holds a lock"
        assert "Unpicklable" in record.error.type
        assert "raise Unpicklable" in record.error.traceback
        assert (await eng.run(good)).result == 1


async def test_retry_validation() -> None:
    with pytest.raises(engine.ConfigError, match="attempts"):
        engine.Retry(-1)
    with pytest.raises(engine.ConfigError, match="jitter"):
        engine.Retry(1, jitter=2)
    with pytest.raises(engine.ConfigError, match="exception classes"):
        engine.Retry(1, on=(42,))  # type: ignore[arg-type]
