"""Fan-out helpers: ``engine.map`` and ``engine.group``."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sized,
)
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ._context import action_var, group_var
from ._errors import ConfigError, EngineError

if TYPE_CHECKING:
    import contextvars
    from types import TracebackType

    from ._action import Action

if TYPE_CHECKING:
    from ._events import TaskCounts

__all__ = ["MapResults", "group", "map"]

R = TypeVar("R")

DEFAULT_WINDOW = 1000


class MapResults(Generic[R]):
    """The results of :func:`map`: await it for a list, or iterate it as they come, in order.

    In async code, ``await`` it or ``async for`` over it; in a sync task
    (which runs in a worker thread), a plain ``for`` (or ``list(...)``)
    does the same, the actions running on the run's event loop meanwhile.
    """

    def __init__(self, task: Callable[..., Any], iterables: tuple[Iterable[Any], ...], window: int, return_exceptions: bool) -> None:
        self._task = task
        self._iterables = iterables
        self._window = window
        self._return_exceptions = return_exceptions
        self._used = False
        # The group the map was made in, which its actions belong to
        # wherever it is consumed (as a task made by asyncio.create_task
        # keeps the context it was created in).
        self._group = group_var.get()

    def __await__(self) -> Generator[Any, None, list[R]]:
        return self._collect().__await__()

    async def _collect(self) -> list[R]:
        return [r async for r in self]

    def __iter__(self) -> Iterator[R]:
        action = action_var.get()
        if action is None:
            return self._iterate_outside_a_run()
        run = action.run
        if run.thread_id == threading.get_ident():
            raise EngineError(
                f"engine.map({_name(self._task)}, ...) is iterated with 'for' in async code, "
                f"which would block the event loop; use 'async for' over it or 'await' it "
                f"('for' works in sync tasks)"
            )
        return self._iterate_from_thread(action, run.loop)

    def _iterate_outside_a_run(self) -> Iterator[R]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return iter(asyncio.run(self._collect()))
        raise EngineError(
            f"engine.map({_name(self._task)}, ...) is iterated with 'for' inside a running "
            f"event loop; use 'async for' over it or 'await' it"
        )

    def _iterate_from_thread(self, action: Action, loop: asyncio.AbstractEventLoop) -> Iterator[R]:
        """A sync task's ``for``: each step of the stream runs on the loop, as the task's own code."""
        group = group_var.get()
        self._claim()
        stream = self._stream()

        def step(awaitable: Awaitable[Any]) -> Any:
            return asyncio.run_coroutine_threadsafe(_as(action, group, awaitable), loop).result()

        try:
            while True:
                try:
                    item: R = step(stream.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            step(stream.aclose())

    def __aiter__(self) -> AsyncIterator[R]:
        self._claim()
        return self._stream()

    def _claim(self) -> None:
        if self._used:
            raise RuntimeError("engine.map results can be consumed only once")
        self._used = True

    async def _stream(self) -> AsyncGenerator[R, None]:
        task = self._task
        items = zip(*self._iterables, strict=False)
        in_flight: deque[asyncio.Future[Any]] = deque()
        window = self._window
        loop = asyncio.get_running_loop()
        # Progress knows the whole fan-out at once when the items have a
        # length: the calls this map has not made yet count as upcoming.
        # Invariant: ``left`` of them are in ``counts.upcoming`` now.
        counts, left = self._announce()

        group = self._group

        def start(args: tuple[Any, ...]) -> asyncio.Future[Any]:
            nonlocal left
            if left:
                left -= 1
                counts.upcoming -= 1  # type: ignore[union-attr]
            if group_var.get() != group:
                # Consumed outside the group it was made in: its actions
                # start (and are labelled) in that group all the same.
                token = group_var.set(group)
                try:
                    return start_in_group(args)
                finally:
                    group_var.reset(token)
            return start_in_group(args)

        def start_in_group(args: tuple[Any, ...]) -> asyncio.Future[Any]:
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
        counts = action.run.counters_for(name, group_var.get(), ranks=getattr(self._task, "nodes", 1))
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
    in the failed item's place.  Its actions belong to the
    :func:`group` the map was made in, even when it is consumed after the
    block.
    """
    if not iterables:
        raise ConfigError("engine.map needs at least one iterable of items")
    if concurrency is None:
        concurrency = DEFAULT_WINDOW
    elif isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"engine.map concurrency= must be a whole number >= 1, got {concurrency!r}")
    return MapResults(task, iterables, concurrency, return_exceptions)


def group(name: str) -> GroupBlock:
    """Label the actions started inside the block (``"shards"``; nested: ``"train/shards"``).

    ``async with engine.group("shards"):`` in async code, ``with
    engine.group("shards"):`` in a sync task (either works in either).  An
    action belongs to the group current where it *starts* (its first step),
    not where its coroutine was made: coroutines made before the block and
    awaited or gathered inside it are in the group; an asyncio task keeps
    the group of the block it was created in, and so does an :func:`map`,
    whose actions are in the group it was made in even if it is awaited
    after the block.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"engine.group takes a non-empty name, got {name!r}")
    return GroupBlock(name)


class GroupBlock:
    """The block of :func:`group`: a context manager, sync and async; gives the full label."""

    __slots__ = ("_name", "_tokens")

    def __init__(self, name: str) -> None:
        self._name = name
        # Invariant: one token per block entered and not yet left (innermost last).
        self._tokens: list[contextvars.Token[str | None]] = []

    def __enter__(self) -> str:
        outer = group_var.get()
        label = self._name if outer is None else f"{outer}/{self._name}"
        self._tokens.append(group_var.set(label))
        action = action_var.get()
        if action is not None:
            action.run.groups.add(label)
        return label

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        group_var.reset(self._tokens.pop())

    async def __aenter__(self) -> str:
        return self.__enter__()

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(typ, exc, tb)


async def _as(action: Action, group: str | None, awaitable: Awaitable[Any]) -> Any:
    """Await ``awaitable`` on the loop as code of ``action`` inside ``group`` (for a sync task)."""
    action_var.set(action)  # this asyncio task's own context: nothing to reset
    group_var.set(group)
    return await awaitable


def _name(task: Any) -> str:
    return str(getattr(task, "name", None) or getattr(task, "__qualname__", None) or task)
