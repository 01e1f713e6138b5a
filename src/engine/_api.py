"""The module-level entry points: ``engine.run``, ``engine.arun``, ``engine.resume``, ...

The blocking ones (``run``, ``resume``, ``runs``, ``get_run``) build an
:class:`Engine` from the configuration for the call, on a loop of their own,
and close it at the end.  The async ones use a default engine built from the
configuration, one per event loop (an engine's locks and queues belong to
one loop), closed when that loop shuts down.  That lazily built default is
the only module-level state in shoal.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._engine import Engine, _check_root
from ._errors import EngineError

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncGenerator, Coroutine, Sequence
    from datetime import datetime
    from pathlib import Path

    from ._client import RecordedRun
    from ._run import Run
    from ._task import Task

__all__ = ["aresume", "arun", "default_engine", "get_run", "latest_run", "report", "resume", "run", "runs"]

P = ParamSpec("P")
R = TypeVar("R")

T = TypeVar("T")

_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Engine, AsyncGenerator[None, None], asyncio.Task[None]]] = (
    weakref.WeakKeyDictionary()
)


def default_engine() -> Engine:
    """The default engine of the running event loop, built from config on first use.

    It is closed (journal, process pool, blob store) when the loop shuts
    down its async generators, which ``asyncio.run`` does before closing
    the loop: a suspended generator whose ``finally`` closes the engine is
    left with the loop for that purpose.
    """
    loop = asyncio.get_running_loop()
    entry = _defaults.get(loop)
    if entry is None:
        eng = Engine()
        closer = _close_at_shutdown(eng)
        started = loop.create_task(_advance(closer), name="shoal-default-engine")
        # The generator must stay referenced: collected, it would be
        # finalized (closing the engine) at once.
        entry = _defaults[loop] = (eng, closer, started)
    return entry[0]


async def _advance(gen: AsyncGenerator[None, None]) -> None:
    await gen.__anext__()


async def _close_at_shutdown(eng: Engine) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        _defaults.pop(asyncio.get_running_loop(), None)
        await eng.aclose()


def _sync(name: str, make: Any) -> Any:
    """Run ``make(engine)`` on a fresh loop with a fresh default engine, closed at the end."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise EngineError(
            f"engine.{name}() cannot be called from a running event loop (it would block it); "
            f"use 'await engine.a{name}(...)' instead"
        )

    from ._signals import SigtermWatch

    watch = SigtermWatch()

    async def main() -> Any:
        async with Engine() as eng:
            return await watch.guard(make(eng))

    try:
        return asyncio.run(main())
    finally:
        watch.die_if_received()


def run(task: Task[Any, Any], /, *args: Any, tags: Sequence[str] = (), cache: bool | None = None, **kwargs: Any) -> Run:
    """Run ``task`` and wait for it (blocking; for scripts and the CLI), journaled as configured.

    Returns the finished :class:`Run` whatever its status.  Ctrl-C cancels
    the run, records it as cancelled, and raises :class:`KeyboardInterrupt`;
    SIGTERM does the same and then ends the process as SIGTERM does (from
    the main thread, unless the application handles SIGTERM itself).
    """
    _check_root(task, "engine.run")
    return _sync("run", lambda eng: eng.run(task, *args, tags=tags, cache=cache, **kwargs))  # type: ignore[no-any-return]


async def arun(task: Task[Any, Any], /, *args: Any, tags: Sequence[str] = (), cache: bool | None = None, **kwargs: Any) -> Run:
    """Like :func:`run`, inside a running event loop."""
    _check_root(task, "engine.arun")
    return await default_engine().run(task, *args, tags=tags, cache=cache, **kwargs)


def resume(run_id: str) -> Run:
    """Continue a failed or interrupted run in place (blocking)."""
    return _sync("resume", lambda eng: eng.resume(run_id))  # type: ignore[no-any-return]


async def aresume(run_id: str) -> Run:
    """Like :func:`resume`, inside a running event loop."""
    return await default_engine().resume(run_id)


def _query(coro: Coroutine[Any, Any, T], name: str) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise EngineError(
        f"engine.{name}() blocks; inside a running event loop use "
        f"'async with engine.Engine(store=...) as eng: await eng.{name}(...)'"
    )


def runs(
    *,
    task: str | Task[Any, Any] | None = None,
    status: str | None = None,
    tag: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
    store: str | os.PathLike[str] | None = None,
    load_code: bool = True,
) -> list[RecordedRun[object]]:
    """Recorded runs, latest first, decoded: of one task (a task or its name), status, tag, since a time.

    ``store``: the journal to read (default: the configured one).
    ``load_code=False`` reads without importing the runs' tasks or
    unpickling anything (see :class:`engine.RecordedRun`).
    """

    async def query() -> list[RecordedRun[object]]:
        async with Engine(store) as eng:
            return await eng.runs(task=task, status=status, tag=tag, since=since, limit=limit, load_code=load_code)

    return _query(query(), "runs")


def get_run(
    run_id: str,
    *,
    actions: bool = False,
    offset: int = 0,
    limit: int = 1000,
    store: str | os.PathLike[str] | None = None,
    load_code: bool = True,
) -> RecordedRun[object]:
    """One recorded run with its arguments and result decoded (a :class:`engine.RecordedRun`).

    ``actions=True`` also reads a page of its actions into
    ``action_records`` (``offset``, ``limit``); ``run.actions(...)`` reads
    any page later.  Raises :class:`engine.RunNotFound` for an unknown id.
    """

    async def query() -> RecordedRun[object]:
        async with Engine(store) as eng:
            return await eng.get_run(run_id, actions=actions, offset=offset, limit=limit, load_code=load_code)

    return _query(query(), "get_run")


@overload
def latest_run(
    task: Task[P, Coroutine[Any, Any, R]], *, status: str | None = "succeeded",
    store: str | os.PathLike[str] | None = None, load_code: bool = True,
) -> RecordedRun[R] | None: ...
@overload
def latest_run(
    task: Task[P, R], *, status: str | None = "succeeded", store: str | os.PathLike[str] | None = None,
    load_code: bool = True,
) -> RecordedRun[R] | None: ...
@overload
def latest_run(
    task: str, *, status: str | None = "succeeded", store: str | os.PathLike[str] | None = None,
    load_code: bool = True,
) -> RecordedRun[object] | None: ...


def latest_run(
    task: Task[Any, Any] | str,
    *,
    status: str | None = "succeeded",
    store: str | os.PathLike[str] | None = None,
    load_code: bool = True,
) -> RecordedRun[Any] | None:
    """The latest run of ``task`` (a task or its name) that has ``status`` (None: any), or None.

    ``engine.latest_run(train).result`` is the last successful training
    run's result, typed by ``train``'s return annotation.
    """

    async def query() -> RecordedRun[Any] | None:
        async with Engine(store) as eng:
            return await eng.latest_run(task, status=status, load_code=load_code)

    return _query(query(), "latest_run")


def report(run_id: str, path: str | os.PathLike[str] | None = None) -> Path:
    """Write the HTML report of a recorded run of the default journal; returns the file's path.

    Blocking, like :func:`get_run`; inside a running event loop use
    ``await Engine().report(run_id, path)``.  See :meth:`Engine.report`
    for what the page holds.
    """

    async def query() -> Path:
        async with Engine() as eng:
            return await eng.report(run_id, path)

    return _query(query(), "report")
