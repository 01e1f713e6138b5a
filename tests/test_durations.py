"""Reported durations: each attempt's own time, up to its final commit, and the total apart."""

from __future__ import annotations

import asyncio
import io
import sqlite3
from typing import TYPE_CHECKING

from rich.console import Console

import engine
from engine._cli._progress import Progress

if TYPE_CHECKING:
    from pathlib import Path

FAIL = {"on": True}


@engine.task
async def flaky() -> int:
    if FAIL["on"]:
        raise ValueError("not yet")
    return 7


@engine.task
async def outer() -> int:
    return await flaky()


async def test_a_resume_reports_its_own_time_and_the_total_apart(tmp_path: Path) -> None:
    FAIL["on"] = True
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        first = await eng.run(outer)
        assert first.status == "failed"
        await asyncio.sleep(0.5)  # time between the attempts, which is not the resume's
        FAIL["on"] = False
        again = await eng.resume(first.id)
        assert again.status == "succeeded" and again.attempt == 2
        out = io.StringIO()
        progress = Progress(eng, Console(file=out, width=200), live=False)
        line = progress.summary(again)
        progress.close()
        record = await eng.get_run(first.id)
    assert "(attempt 2; " in line and "since the first)" in line
    assert record.attempt_duration is not None and record.duration is not None
    assert record.attempt_duration < 0.5 <= record.duration
    assert record.attempt_started is not None and record.attempt_started > record.started


async def test_a_runs_duration_includes_its_final_commit(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    gate = asyncio.Event()
    returned = asyncio.Event()

    @engine.task(name="quick")
    async def quick() -> int:
        await gate.wait()
        returned.set()
        return 1

    async with engine.Engine(store=path) as eng:
        run = await eng.submit(quick)
        while run.counters.get("quick") is None or run.counters["quick"].running == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            gate.set()
            await returned.wait()
            loop = asyncio.get_running_loop()
            at_return = loop.time()
            await asyncio.sleep(0.5)  # its record cannot be committed meanwhile
        finally:
            blocker.execute("COMMIT")
            blocker.close()
        await run.wait()
        waited = loop.time() - at_return
    assert run.status == "succeeded"
    assert run.finished_at is not None
    took = (run.finished_at - run.started_at).total_seconds()
    # The run was not over when its function returned: its commit is part of its time.
    assert took >= waited - 0.05
