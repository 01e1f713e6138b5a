"""Action events for embedding applications, and per-task counters for progress.

Finished actions are not kept in memory: progress displays read
:class:`TaskCounts` (a handful of integers per task), and applications that
want each state change subscribe with :meth:`Engine.events`.
"""

# No `from __future__ import annotations`: msgspec resolves ActionEvent's
# annotations in the module named by __module__ ("engine").
import asyncio
from collections.abc import AsyncIterator, Callable
from typing import ClassVar, Literal

import msgspec

__all__ = ["ActionEvent", "EventStream", "TaskCounts"]

EventKind = Literal["started", "retrying", "succeeded", "failed", "cancelled", "cached", "replayed"]
EVENT_KINDS: frozenset[str] = frozenset(
    ("started", "retrying", "succeeded", "failed", "cancelled", "cached", "replayed")
)


class TaskCounts:
    """How many actions of one task (in one ``engine.group``, if any) are in each state, in one run.

    Invariant: ``pending + running + committing`` is the number of actions
    of this task created and not yet finished; each finished action is
    counted exactly once in ``succeeded``, ``failed`` or ``cancelled``.
    ``committing`` counts actions whose work is done and whose record waits
    for the journal's next commit (always 0 without a journal): they are
    not running any more, and not succeeded until their record is durable.  ``cached`` (served
    from the cross-run cache) and ``replayed`` (served from the journal on
    resume) are subsets of ``succeeded``; ``retries`` counts retried attempts.

    ``upcoming`` is not a state: it counts the calls an ``engine.map`` over
    a sized iterable will still make and has not made yet (they are no
    actions yet), so that progress knows the total from the start.
    ``group`` is the ``engine.group`` label of these actions (None outside
    any group).  ``ranks`` is how many ranks each action runs as (a gang's
    ``nodes``; 1 for an ordinary task): a gang counts as one action.
    """

    __slots__ = (
        "cached",
        "cancelled",
        "committing",
        "failed",
        "group",
        "name",
        "pending",
        "ranks",
        "replayed",
        "retries",
        "running",
        "succeeded",
        "upcoming",
    )

    #: What one count is: an action here; ``parallel_map`` counts its items
    #: with a subclass that says "items", and ``Run.stats`` sums actions only.
    unit: ClassVar[str] = "actions"

    def __init__(self, name: str, group: str | None = None) -> None:
        self.name = name
        self.group = group
        self.upcoming = 0
        self.pending = 0
        self.running = 0
        self.committing = 0
        self.succeeded = 0
        self.failed = 0
        self.cancelled = 0
        self.cached = 0
        self.replayed = 0
        self.retries = 0
        self.ranks = 1

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def finished(self) -> int:
        """Actions whose work is over: done, or only waiting for their record's commit."""
        return self.committing + self.succeeded + self.failed + self.cancelled

    @property
    def total(self) -> int:
        return self.pending + self.running + self.committing + self.done

    def as_dict(self) -> dict[str, int]:
        return {
            "pending": self.pending,
            "running": self.running,
            "committing": self.committing,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "cached": self.cached,
            "replayed": self.replayed,
            "retries": self.retries,
        }

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.as_dict().items() if v)
        where = "" if self.group is None else f", group={self.group!r}"
        return f"TaskCounts({self.name!r}{where}, {inner})"


class ActionEvent(msgspec.Struct, frozen=True, tag=True):
    """One state change of one action."""

    kind: EventKind
    run_id: str
    action_id: str
    task: str
    attempt: int
    at: float
    group: str | None = None
    error: str | None = None


class EventStream:
    """An async iterator over action events, from the moment it was created.

    Use as ``async with eng.events() as events: async for ev in events: ...``
    (or just iterate; it unsubscribes when the iteration ends or the stream
    is closed).  ``kinds`` keeps only those kinds of event (the engine does
    not even build the others when nobody wants them).  The buffer holds at
    most ``maxsize`` events; when a slow consumer lets it fill up, the oldest
    events are dropped and counted in ``dropped`` rather than slowing the
    engine.
    """

    def __init__(
        self,
        subscribers: "list[EventStream]",
        kinds: "frozenset[str]",
        maxsize: int = 100_000,
        on_change: "Callable[[], None] | None" = None,
    ) -> None:
        self._subscribers = subscribers
        self.kinds = kinds
        self._on_change = on_change
        self._queue: asyncio.Queue[ActionEvent | None] = asyncio.Queue(maxsize)
        self.dropped = 0
        subscribers.append(self)
        if on_change is not None:
            on_change()

    def put(self, event: ActionEvent | None) -> None:
        queue = self._queue
        if queue.full():
            queue.get_nowait()
            self.dropped += 1
        queue.put_nowait(event)

    def close(self) -> None:
        """Stop the stream: iteration ends after the events already buffered."""
        if self in self._subscribers:
            self._subscribers.remove(self)
            if self._on_change is not None:
                self._on_change()
            self.put(None)

    def __aiter__(self) -> AsyncIterator[ActionEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ActionEvent]:
        try:
            while True:
                event = await self._queue.get()
                if event is None:
                    return
                yield event
        finally:
            self.close()

    async def __aenter__(self) -> "EventStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
