"""A live run, read back while it runs: its running actions are listed."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import engine

if TYPE_CHECKING:
    from pathlib import Path

GATE: dict[str, asyncio.Event] = {}


@engine.task
async def held(i: int) -> int:
    await GATE["open"].wait()
    return i


@engine.task
async def quick(i: int) -> int:
    return i


@engine.task
async def holder(n: int) -> int:
    await asyncio.gather(*(quick(i) for i in range(3)))
    async with engine.group("slow"):
        return sum(await asyncio.gather(*(held(i) for i in range(n))))


async def test_shoal_show_of_a_live_run_lists_its_running_actions(tmp_path: Path) -> None:
    GATE["open"] = asyncio.Event()
    async with engine.Engine(home=tmp_path / "home") as eng:
        run = await eng.submit(holder, 6)
        deadline = time.monotonic() + 20
        while True:
            try:
                shown = await eng.get_run(run.id, actions=True)
            except engine.RunNotFound:  # its first record is not committed yet
                await asyncio.sleep(0.05)
                continue
            running = [a for a in shown.action_records if a.state == "running"]
            if len(running) == 7 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert sorted(a.task for a in running) == ["held"] * 6 + ["holder"]
        assert {a.group for a in running if a.task == "held"} == {"slow"}
        assert all(a.started_at is not None for a in running)
        counted = {(t.task, t.group): t.running for t in shown.tasks}
        assert counted[("held", "slow")] == 6
        assert shown.action_count == 3 + 6 + 1
        GATE["open"].set()
        await run.wait()
        assert run.result == sum(range(6))
        done = await eng.get_run(run.id, actions=True)
        assert [a for a in done.action_records if a.state == "running"] == []
        assert {a.state for a in done.action_records} == {"succeeded"}
