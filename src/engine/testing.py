"""Helpers for testing your own flows, and the pytest plugin that offers them as fixtures.

Installed with shoal, the plugin is loaded by pytest itself (the ``pytest11``
entry point ``shoal``), the way anyio ships its own.  Every fixture's name
starts with ``shoal_``, so none clashes with a project's own fixtures:

``shoal_sleep``
    A :class:`FakeSleep`: the engines below wait between retries through it,
    so retries and backoff take no time; ``shoal_sleep.delays`` lists the
    delays the engine asked for.
``shoal_rng``
    ``random.Random(0)``: the backoff's jitter, the same in every run.
``shoal_engine``
    An :class:`engine.Engine` with ``store="memory"`` (nothing on disk).
``shoal_journaled_engine``
    An engine journaled to a SQLite file in the test's temporary folder
    (``tmp_path / "shoal.db"``), for resume, cache and ``get_run`` tests.
``shoal_run``
    ``await shoal_run(task, *args, **kwargs)`` runs ``task`` on
    ``shoal_engine`` (or ``engine=`` another) and returns its :class:`Run`.

The engine fixtures are async and need pytest-asyncio (they are left out
when it is not installed).  For plain sync tests, :func:`run_task` runs a
task on an engine of its own and returns the finished run.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Any

import pytest

from ._engine import Engine

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ._run import Run
    from ._task import Task

__all__ = ["FakeSleep", "RunTask", "run_task"]


class FakeSleep:
    """An engine's ``sleep=`` that returns at once and records each delay (seconds) in ``delays``."""

    def __init__(self) -> None:
        #: The delays asked for, in order.
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)  # still a point where other actions run

    @property
    def total(self) -> float:
        """Seconds the engine would have slept."""
        return sum(self.delays)


class RunTask:
    """``await run_task(task, *args, engine=None, tags=(), **kwargs)``: run a task, return its Run."""

    def __init__(self, default: Engine) -> None:
        self.engine = default

    async def __call__(
        self, task: Task[Any, Any], /, *args: Any, engine: Engine | None = None, tags: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> Run:
        return await (engine or self.engine).run(task, *args, tags=tags, **kwargs)


def run_task(
    task: Task[Any, Any], /, *args: Any, store: str | os.PathLike[str] = "memory", sleep: FakeSleep | None = None,
    **kwargs: Any,
) -> Run:
    """Run ``task`` to the end on a fresh engine (blocking, for sync tests) and return its :class:`Run`.

    ``store`` is ``"memory"`` (the default) or a journal file; retries do
    not sleep (``sleep``, a :class:`FakeSleep`, records their delays).
    Cannot be called from a running event loop: use the ``shoal_run``
    fixture there.
    """
    waits = sleep if sleep is not None else FakeSleep()

    async def go() -> Run:
        async with Engine(store=store, sleep=waits, rng=random.Random(0)) as eng:
            return await eng.run(task, *args, **kwargs)

    return asyncio.run(go())


@pytest.fixture
def shoal_sleep() -> FakeSleep:
    """The engines' sleep between retries: returns at once, records the delays."""
    return FakeSleep()


@pytest.fixture
def shoal_rng() -> random.Random:
    """The engines' source of backoff jitter, seeded: the same delays in every run."""
    return random.Random(0)


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the async fixtures need it
    pass
else:

    @pytest_asyncio.fixture
    async def shoal_engine(shoal_sleep: FakeSleep, shoal_rng: random.Random) -> AsyncIterator[Engine]:
        """An engine that keeps nothing (``store="memory"``) and never sleeps between retries."""
        async with Engine(store="memory", sleep=shoal_sleep, rng=shoal_rng) as eng:
            yield eng

    @pytest_asyncio.fixture
    async def shoal_journaled_engine(
        tmp_path: Path, shoal_sleep: FakeSleep, shoal_rng: random.Random
    ) -> AsyncIterator[Engine]:
        """An engine journaled to ``tmp_path / "shoal.db"`` (home ``tmp_path / ".shoal"``), no sleeping."""
        async with Engine(
            store=tmp_path / "shoal.db", home=tmp_path / ".shoal", sleep=shoal_sleep, rng=shoal_rng
        ) as eng:
            yield eng

    @pytest_asyncio.fixture
    async def shoal_run(shoal_engine: Engine) -> RunTask:
        """``await shoal_run(task, *args, **kwargs)``: the task's :class:`Run` on ``shoal_engine``."""
        return RunTask(shoal_engine)
