"""Fan-out helpers: ``engine.map`` and ``engine.group``."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sized
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ._context import action_var, group_var
from ._errors import ConfigError

if TYPE_CHECKING:
    from ._events import TaskCounts

__all__ = ["MapResults", "group", "map"]

R = TypeVar("R")

DEFAULT_WINDOW = 1000


class MapResults(Generic[R]):
    """The results of :func:`map`: await it for a list, or iterate it as they come, in order."""

    def __init__(self, task: Callable[..., Any], iterables: tuple[Iterable[Any], ...], window: int, return_exceptions: bool) -> None:
        self._task = task
        self._iterables = iterables
        self._window = window
        self._return_exceptions = return_exceptions
        self._used = False

    def __await__(self) -> Generator[Any, None, list[R]]:
        return self._collect().__await__()

    async def _collect(self) -> list[R]:
        return [r async for r in self]

    def __aiter__(self) -> AsyncIterator[R]:
        if self._used:
            raise RuntimeError("engine.map results can be consumed only once")
        self._used = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[R]:
        task = self._task
        items = zip(*self._iterables, strict=False)
        in_flight: deque[asyncio.Future[Any]] = deque()
        window = self._window
        loop = asyncio.get_running_loop()
        # Progress knows the whole fan-out at once when the items have a
        # length: the calls this map has not made yet count as upcoming.
        # Invariant: ``left`` of them are in ``counts.upcoming`` now.
        counts, left = self._announce()

        def start(args: tuple[Any, ...]) -> asyncio.Future[Any]:
            nonlocal left
            if left:
                left -= 1
                counts.upcoming -= 1  # type: ignore[union-attr]
            made = task(*args)
            if isinstance(made, Awaitable):
                return asyncio.ensure_future(made)
            done = loop.create_future()
            done.set_result(made)
            return done

        try:
            for args in items:
                in_flight.append(start(args))
                if len(in_flight) >= window:
                    yield await self._next(in_flight)
            while in_flight:
                yield await self._next(in_flight)
        finally:
            if left:
                counts.upcoming -= left  # type: ignore[union-attr]
            # Whatever is still in flight (a failure, or the consumer stopped
            # early) is cancelled: map never leaves actions behind.
            for fut in in_flight:
                fut.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    def _announce(self) -> tuple[TaskCounts | None, int]:
        """Count this map's calls as upcoming in its run's progress, when they are known."""
        action = action_var.get()
        name = getattr(self._task, "name", None)
        if action is None or not isinstance(name, str):
            return None, 0
        if not all(isinstance(items, Sized) for items in self._iterables):
            return None, 0
        n = min(len(items) for items in self._iterables)  # type: ignore[arg-type]
        counts = action.run.counters_for(name, group_var.get())
        counts.upcoming += n
        return counts, n

    async def _next(self, in_flight: deque[asyncio.Future[Any]]) -> Any:
        head = in_flight[0]
        try:
            result = await head
        except Exception as exc:
            in_flight.popleft()
            if self._return_exceptions:
                return exc
            raise
        in_flight.popleft()
        return result


@overload
def map(
    task: Callable[..., Awaitable[R]],
    *iterables: Iterable[Any],
    concurrency: int | None = None,
    return_exceptions: bool = False,
) -> MapResults[R]: ...
@overload
def map(
    task: Callable[..., R],
    *iterables: Iterable[Any],
    concurrency: int | None = None,
    return_exceptions: bool = False,
) -> MapResults[R]: ...


def map(
    task: Callable[..., Any],
    *iterables: Iterable[Any],
    concurrency: int | None = None,
    return_exceptions: bool = False,
) -> MapResults[Any]:
    """Call ``task`` once per item (zipping several iterables like ``builtins.map``).

    Await the result for a list in input order, or ``async for`` over it to
    get the results in order as they come.  At most ``concurrency`` actions
    (default 1000) are created ahead of the consumer, so a million items
    never means a million coroutines at once, and items are taken from the
    iterables lazily.  The first failure cancels the actions in flight and
    raises, unless ``return_exceptions=True``, which yields the exception
    in the failed item's place.
    """
    if not iterables:
        raise ConfigError("engine.map needs at least one iterable of items")
    if concurrency is None:
        concurrency = DEFAULT_WINDOW
    elif isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"engine.map concurrency= must be a whole number >= 1, got {concurrency!r}")
    return MapResults(task, iterables, concurrency, return_exceptions)


@contextlib.asynccontextmanager
async def group(name: str) -> AsyncIterator[str]:
    """Label the actions started inside the block (``"shards"``; nested: ``"train/shards"``)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"engine.group takes a non-empty name, got {name!r}")
    outer = group_var.get()
    label = name if outer is None else f"{outer}/{name}"
    token = group_var.set(label)
    action = action_var.get()
    if action is not None:
        action.run.groups.add(label)
    try:
        yield label
    finally:
        group_var.reset(token)
