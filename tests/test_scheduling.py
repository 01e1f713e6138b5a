"""Admission: engine-wide max_concurrency, per-task concurrency and resource slots."""

from __future__ import annotations

import asyncio

import pytest

import engine


class Gauge:
    """Tracks how many holders are inside at once, seen from inside the tasks."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def hold(self, seconds: float = 0.005) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1


async def test_per_task_concurrency_is_observed_from_inside(eng: engine.Engine) -> None:
    gauge = Gauge()

    @engine.task(concurrency=3)
    async def limited(i: int) -> int:
        await gauge.hold()
        return i

    @engine.task
    async def main(n: int) -> int:
        return sum(await asyncio.gather(*(limited(i) for i in range(n))))

    run = await eng.run(main, 40)
    assert run.result == sum(range(40))
    assert gauge.peak == 3


async def test_engine_max_concurrency_bounds_running_actions() -> None:
    gauge = Gauge()

    @engine.task
    async def leaf(i: int) -> int:
        await gauge.hold()
        return i

    @engine.task
    async def middle(k: int) -> int:
        return sum(await asyncio.gather(*(leaf(k * 10 + j) for j in range(10))))

    @engine.task
    async def main() -> int:
        # Parents waiting for children must not hold slots, or this deadlocks.
        return sum(await asyncio.gather(*(middle(k) for k in range(8))))

    async with engine.Engine(store="memory", max_concurrency=4) as eng:
        run = await eng.run(main)
    assert run.status == "succeeded", run.error
    assert run.result == sum(range(80))
    assert gauge.peak == 4


async def test_cpu_slots_limit_resource_hungry_actions() -> None:
    gauge = Gauge()

    @engine.task(resources=engine.Resources(cpu=2))
    async def heavy(i: int) -> int:
        await gauge.hold()
        return i

    @engine.task
    async def main() -> int:
        return sum(await asyncio.gather(*(heavy(i) for i in range(12))))

    async with engine.Engine(store="memory", cpus=5) as eng:
        run = await eng.run(main)
        assert eng.cpu_slots.in_use == 0
    assert run.result == sum(range(12))
    assert gauge.peak == 2  # 5 slots hold two 2-cpu actions


async def test_asking_for_more_cpus_than_exist_fails_at_the_call() -> None:
    @engine.task(resources=engine.Resources(cpu=64))
    async def huge() -> int:
        return 1

    @engine.task
    async def main() -> int:
        return await huge()

    async with engine.Engine(store="memory", cpus=4) as eng:
        run = await eng.run(main)
    assert run.status == "failed"
    assert isinstance(run.error, engine.ResourceError)
    assert "cpu=64" in str(run.error) and "4 CPU slots" in str(run.error)


async def test_gpu_task_on_a_machine_without_gpus_errors_instead_of_hanging() -> None:
    @engine.task(resources=engine.Resources(gpu=1))
    async def train() -> str:
        return "trained"

    @engine.task
    async def main() -> str:
        return await train()

    async with engine.Engine(store="memory", gpus=0) as eng:
        run = await asyncio.wait_for(eng.run(main), timeout=30)
    assert run.status == "failed"
    assert isinstance(run.error, engine.ResourceError)
    assert "gpu=1" in str(run.error) and "0 GPUs" in str(run.error)
    with pytest.raises(engine.RunFailed) as info:
        _ = run.result
    assert info.value.__cause__ is run.error


async def test_gpu_slots_are_shared() -> None:
    gauge = Gauge()

    @engine.task(resources=engine.Resources(gpu=1))
    async def train(i: int) -> int:
        await gauge.hold()
        return i

    @engine.task
    async def main() -> int:
        return sum(await asyncio.gather(*(train(i) for i in range(6))))

    async with engine.Engine(store="memory", gpus=2) as eng:
        run = await eng.run(main)
    assert run.result == 15
    assert gauge.peak == 2


async def test_sync_tasks_do_not_block_the_loop(eng: engine.Engine) -> None:
    import time

    ticks = 0

    @engine.task
    def blocking() -> None:
        time.sleep(0.2)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    @engine.task
    async def main() -> None:
        await blocking()  # type: ignore[misc]

    t = asyncio.create_task(ticker())
    await eng.run(main)
    t.cancel()
    assert ticks >= 5  # the loop kept turning while the sync task slept


async def test_a_task_sent_to_an_unknown_target_fails_rather_than_run_locally(eng: engine.Engine) -> None:
    @engine.task(offload="gpu-hosts")
    async def train() -> str:
        return "ran locally"

    @engine.task
    async def main() -> str:
        return await train()

    run = await eng.run(main)
    assert run.status == "failed"
    assert isinstance(run.error, engine.ConfigError)
    message = str(run.error)
    assert "'gpu-hosts'" in message and "not defined" in message and "'local'" in message


async def test_many_sync_tasks_calling_sync_tasks_do_not_deadlock(eng: engine.Engine) -> None:
    @engine.task
    def leaf(i: int) -> int:
        return i

    @engine.task
    def mid(i: int) -> int:
        return leaf(i) + 1

    @engine.task
    async def main(n: int) -> int:
        return sum(await asyncio.gather(*(mid(i) for i in range(n))))  # type: ignore[call-overload]

    run = await asyncio.wait_for(eng.run(main, 60), 60)
    assert run.result == sum(range(60)) + 60


async def test_a_timed_out_sync_task_keeps_its_slots_until_its_thread_ends() -> None:
    import threading
    import time

    inside = 0
    peak = 0
    lock = threading.Lock()

    @engine.task(timeout=0.05, resources=engine.Resources(cpu=1))
    def slow(i: int) -> None:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.3)
        with lock:
            inside -= 1

    @engine.task
    async def main() -> int:
        results = await asyncio.gather(*(slow(i) for i in range(6)), return_exceptions=True)  # type: ignore[call-overload]
        return sum(isinstance(r, engine.ActionTimeout) for r in results)

    async with engine.Engine(store="memory", cpus=2) as eng:
        run = await eng.run(main)
        # Threads still running hold their slots until they end.
        for _ in range(100):
            if eng.cpu_slots.in_use == 0:
                break
            await asyncio.sleep(0.05)
        assert eng.cpu_slots.in_use == 0
    assert run.result == 6
    assert peak <= 2
