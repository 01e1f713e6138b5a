"""Reported durations: each attempt's own time and the total apart.

(That a run's time includes its final commit is checked in test_journal.py,
where a test already holds a commit back.)
"""

from __future__ import annotations

import asyncio
import io
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
    assert record.attempt_started_at is not None and record.attempt_started_at > record.started_at
