"""Tasks, actions, keys and argument validation."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import msgspec
import pytest

import engine


@engine.task
async def square(x: int) -> int:
    return x * x


@engine.task
async def total(n: int = 100) -> int:
    return sum(await asyncio.gather(*(square(i) for i in range(n))))


class Point(msgspec.Struct):
    x: float
    y: float


@engine.task
async def norm2(p: Point, scale: float = 1.0) -> float:
    return (p.x * p.x + p.y * p.y) * scale


def test_design_example_runs_with_the_default_engine() -> None:
    run = engine.run(total, n=10)
    assert run.status == "succeeded"
    assert run.result == 285
    assert run.stats["succeeded"] == 11
    assert run.started_at <= run.finished_at  # type: ignore[operator]


async def test_arun_inside_a_running_loop() -> None:
    run = await engine.arun(total, n=10)
    assert (run.status, run.result) == ("succeeded", 285)


async def test_engine_context_manager_memory_store(eng: engine.Engine) -> None:
    run = await eng.run(total, n=10)
    assert run.result == 285
    assert run.counters["square"].succeeded == 10
    assert run.counters["total"].succeeded == 1


async def test_outside_a_run_a_task_is_the_plain_function() -> None:
    assert await square(7) == 49
    assert square.name == "square"
    assert square.__name__ == "square"


def test_sync_task_outside_a_run_returns_the_value() -> None:
    @engine.task
    def add(a: int, b: int) -> int:
        return a + b

    assert add(2, 3) == 5


async def test_sync_tasks_run_in_worker_threads(eng: engine.Engine) -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []

    @engine.task
    def blocking(x: int) -> int:
        seen.append(threading.get_ident())
        return x + 1

    @engine.task
    async def main() -> list[int]:
        # Inside a run a sync task returns an awaitable too.
        return list(await asyncio.gather(*(blocking(i) for i in range(4))))  # type: ignore[call-overload]

    run = await eng.run(main)
    assert run.result == [1, 2, 3, 4]
    assert seen and loop_thread not in seen


async def test_sync_task_can_call_another_task(eng: engine.Engine) -> None:
    @engine.task
    def outer(x: int) -> int:
        return square(x) + 1  # type: ignore[operator]

    run = await eng.run(outer, 4)
    assert run.result == 17
    assert run.counters["square"].succeeded == 1


async def test_structured_arguments_are_converted(eng: engine.Engine) -> None:
    @engine.task
    async def main() -> float:
        return await norm2({"x": 3, "y": 4}, scale=2)  # type: ignore[arg-type]

    run = await eng.run(main)
    assert run.result == 50.0


async def test_wrong_argument_type_raises_input_error_at_the_call(eng: engine.Engine) -> None:
    @engine.task
    async def main() -> str:
        try:
            square("three")  # type: ignore[arg-type, unused-coroutine]
        except engine.InputError as exc:
            return str(exc)
        return "no error"

    run = await eng.run(main)
    message = run.result
    assert "square" in message
    assert "'x'" in message
    assert "int" in message
    assert "'three'" in message
    # Nothing was scheduled for the bad call.
    assert "square" not in run.counters or run.counters["square"].total == 0


async def test_input_error_is_also_a_type_error(eng: engine.Engine) -> None:
    with pytest.raises(TypeError, match=r"task 'total', parameter 'n': expected int, got 'ten'"):
        await eng.run(total, n="ten")


async def test_missing_and_unknown_arguments(eng: engine.Engine) -> None:
    with pytest.raises(engine.InputError, match="missing the required argument 'x'"):
        await eng.run(square)
    with pytest.raises(engine.InputError, match="has no parameter 'y'"):
        await eng.run(square, x=1, y=2)
    with pytest.raises(engine.InputError, match="takes 1 positional"):
        await eng.run(square, 1, 2)


async def test_struct_field_errors_name_the_field(eng: engine.Engine) -> None:
    with pytest.raises(engine.InputError, match=r"parameter 'p'.*\$\.y"):
        await eng.run(norm2, {"x": 1, "y": "up"})


async def test_a_non_task_passed_to_run_is_refused(eng: engine.Engine) -> None:
    async def plain() -> int:
        return 1

    with pytest.raises(engine.InputError, match=r"takes a task.*@engine.task"):
        await eng.run(plain)  # type: ignore[arg-type]
    with pytest.raises(engine.InputError, match=r"@engine\.task"):
        engine.run(plain)  # type: ignore[arg-type]
    # The engine keeps working.
    assert (await eng.run(square, 3)).result == 9


async def test_run_inside_a_running_loop_points_at_arun() -> None:
    with pytest.raises(engine.EngineError, match=r"await engine.arun"):
        engine.run(square, 2)


def test_unknown_task_option_is_refused_with_a_hint() -> None:
    with pytest.raises(engine.ConfigError, match=r"unknown option 'retires'.*'retries'"):

        @engine.task(retires=3)
        async def f() -> None: ...


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"concurrency": 0}, "concurrency= .* >= 1"),
        ({"concurrency": -2}, "concurrency="),
        ({"timeout": 0}, "timeout="),
        ({"retries": "twice"}, "retries="),
        ({"cache": 3}, "cache="),
        ({"resources": {"cpu": 2}}, "resources="),
    ],
)
def test_bad_task_options(options: dict[str, object], match: str) -> None:
    with pytest.raises(engine.ConfigError, match=match):
        engine.task(**options)(square.fn)


def test_bad_engine_options() -> None:
    with pytest.raises(engine.ConfigError, match="max_concurrency"):
        engine.Engine(store="memory", max_concurrency=0)


async def test_environment_shares_defaults(eng: engine.Environment) -> None:
    env = engine.Environment("train", retries=2, timeout=5.0)

    @env.task
    async def fit(x: int) -> int:
        return x

    @env.task(retries=0)
    async def evaluate(x: int) -> int:
        return x

    assert fit.name == "train.fit"
    assert (fit.retry.attempts, fit.timeout) == (2, 5.0)
    assert evaluate.retry.attempts == 0
    assert set(env.tasks) == {"train.fit", "train.evaluate"}
    with pytest.raises(engine.ConfigError, match="unknown option"):
        engine.Environment("x", gpu=1)


async def test_keys_do_not_depend_on_scheduling_order() -> None:
    """The same calls get the same keys whatever order they complete in."""
    delays: dict[int, float] = {}
    finish_order: list[int] = []

    @engine.task
    async def leaf(x: int) -> int:
        await asyncio.sleep(delays[x])
        finish_order.append(x)
        return x

    @engine.task
    async def main() -> list[int]:
        # Two identical calls: told apart by their occurrence.
        return list(await asyncio.gather(leaf(0), leaf(0), leaf(1), leaf(2)))

    keys: list[dict[str, str]] = []
    orders: list[list[int]] = []
    for plan in ({0: 0.03, 1: 0.0, 2: 0.015}, {0: 0.0, 1: 0.03, 2: 0.015}):
        delays.clear()
        delays.update(plan)
        finish_order.clear()
        async with engine.Engine(store="journal.db") as e:
            run = await e.run(main)
            details = await e.get_run(run.id, actions=True)
        keys.append({a.key: a.task for a in details.action_records})
        orders.append(list(finish_order))
    assert orders[0] != orders[1]
    assert len(keys[0]) == 5  # main + four leaves, the two leaf(0) calls distinct
    assert keys[0] == keys[1]


async def test_var_arguments_are_validated_and_positional_only_respected(eng: engine.Engine) -> None:
    @engine.task
    async def va(*args: int, **kw: int) -> int:
        return sum(args) + sum(kw.values())

    @engine.task
    async def po(x: int, /, **kw: int) -> tuple[int, dict[str, int]]:
        return x, kw

    assert (await eng.run(va, 1, 2, z=3)).result == 6
    with pytest.raises(engine.InputError, match=r"parameter 'args': expected int, got 'a'"):
        await eng.run(va, "a")
    with pytest.raises(engine.InputError, match=r"parameter 'kw': expected int, got 'b'"):
        await eng.run(va, z="b")
    assert (await eng.run(po, 1, x=2)).result == (1, {"x": 2})

    @engine.task
    async def po2(x: int, /) -> int:
        return x

    with pytest.raises(engine.InputError, match="positional-only"):
        await eng.run(po2, x=1)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: engine.Resources(cpu="4"), "cpu= is a number"),  # type: ignore[arg-type]
        (lambda: engine.Resources(gpu=0.5), "gpu= is a whole number"),  # type: ignore[arg-type]
        (lambda: engine.Resources(memory="lots"), "memory"),
        (lambda: engine.Retry(1, backoff="1"), "backoff= is a number"),  # type: ignore[arg-type]
        (lambda: engine.Engine(store=123), "store="),  # type: ignore[arg-type]
    ],
)
def test_bad_option_values_get_a_config_error(make: Any, match: str) -> None:
    with pytest.raises(engine.ConfigError, match=match):
        make()


async def test_events_take_one_kind_or_several(eng: engine.Engine) -> None:
    async with eng.events(kinds="failed") as one:
        assert one.kinds == frozenset({"failed"})
    with pytest.raises(engine.ConfigError, match="unknown event kind"):
        eng.events(kinds={"finished"})
